"""Conversations with tool calls: rows with a `tools` list, assistant `tool_calls` and `tool` results are
validated (file, line, field), rendered by templates written the way Qwen2.5 and Llama 3.1 ship their tool
support exactly as `apply_chat_template(tools=...)` renders them, and masked so that the assistant's calls and
replies are trained on and the tool results are not. chatsmith's own templates refuse tool calls by name.

Run: python -m pytest tests/test_tool_calls.py -q
"""

from __future__ import annotations

import json

import pytest
from families import FAMILIES, build_tokenizer

from chatsmith.chat.render import render_chat, render_prompt
from chatsmith.chat.templates import get_format
from chatsmith.data.formats import load_examples
from chatsmith.errors import DataError, TemplateError

# Qwen2.5 (tokenizer_config.json of Qwen2.5-*-Instruct): the tools in the system turn, each call in
# <tool_call> tags after the content, results in a user turn inside <tool_response> tags.
QWEN25_TOOLS = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3.1 (Meta-Llama-3.1-*-Instruct, without the built-in tools): the tools in the first user turn, a call
# as the turn's whole text ({"name", "parameters"}), results in `ipython` turns.
LLAMA31_TOOLS = (
    "{{- bos_token }}"
    "{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}"
    "{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- if tools_in_user_message and not tools is none %}"
    "{%- if messages | length != 0 %}"
    "{%- set first_user_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{{- raise_exception('Cannot put tools in the first user message when there is none!') }}{%- endif %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}"
    "{{- 'Given the following functions, please respond with a JSON for a function call ' }}"
    "{{- 'with its proper arguments that best answers the given prompt.\\n\\n' }}"
    "{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}"
    "{{- 'Do not use variables.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first_user_message + '<|eot_id|>'}}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}"
    "{%- if not message.tool_calls|length == 1 %}"
    "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
    "{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}{{- tool_call.arguments | tojson }}"
    "{{- '}' }}{{- '<|eot_id|>' }}"
    "{%- elif message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}"
    "{%- else %}{{- message.content }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"type": "function", "id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny in Paris."}]


def tokenizer_with(family: str, template: str):
    tokenizer = build_tokenizer(FAMILIES[family])
    tokenizer.chat_template = template
    return tokenizer


def masked_texts(tokenizer, rendered) -> list[str]:
    """The decoded runs of masked tokens, in order."""
    runs, current = [], []
    for token, bit in zip(rendered.input_ids + [None], rendered.assistant_mask + [0]):
        if bit:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current)), current.clear()
    return runs


@pytest.mark.parametrize("family,template,call_text,end", [
    ("qwen2", QWEN25_TOOLS, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "<|im_end|>"),
    ("llama", LLAMA31_TOOLS, '{"name": "get_weather", "parameters": {"city": "Paris"}}', "<|eot_id|>"),
])
def test_shipped_tool_templates_render_as_transformers_and_mask_calls_not_results(family, template, call_text, end):
    tokenizer = tokenizer_with(family, template)
    fmt = get_format(None, tokenizer)
    rendered = render_chat(CHAT, tokenizer, fmt, tools=TOOLS)
    assert rendered.text == tokenizer.apply_chat_template(CHAT, tools=TOOLS, tokenize=False)
    assert "get_weather" in rendered.text.split(call_text)[0]      # the tools list is in the prompt
    assert masked_texts(tokenizer, rendered) == [call_text + end, CHAT[3]["content"] + end]
    # the prompt of the call turn is a prefix of the training ids: the model is trained on what it generates
    prompt = render_prompt(CHAT[:1], tokenizer, fmt, tools=TOOLS)
    assert rendered.input_ids[:len(prompt)] == prompt and not any(rendered.assistant_mask[:len(prompt)])
    after_result = render_prompt(CHAT[:3], tokenizer, fmt, tools=TOOLS)
    assert rendered.input_ids[:len(after_result)] == after_result


def test_a_json_tool_result_is_escaped_as_llama_31_writes_it():
    tokenizer = tokenizer_with("llama", LLAMA31_TOOLS)
    chat = [*CHAT[:2], dict(CHAT[2], content='{"temp": 18,\n "sky": "sunny"}'), CHAT[3]]
    rendered = render_chat(chat, tokenizer, get_format(None, tokenizer), tools=TOOLS)
    assert rendered.text == tokenizer.apply_chat_template(chat, tools=TOOLS, tokenize=False)
    assert '"{\\"temp\\": 18,\\n' in rendered.text
    assert masked_texts(tokenizer, rendered)[-1] == CHAT[3]["content"] + "<|eot_id|>"


def test_assistant_text_before_a_call_is_trained_on_too():
    tokenizer = tokenizer_with("qwen2", QWEN25_TOOLS)
    chat = [CHAT[0], dict(CHAT[1], content="Let me check."), *CHAT[2:]]
    rendered = render_chat(chat, tokenizer, get_format(None, tokenizer), tools=TOOLS)
    assert rendered.text == tokenizer.apply_chat_template(chat, tools=TOOLS, tokenize=False)
    assert masked_texts(tokenizer, rendered)[0].startswith("Let me check.\n<tool_call>\n")


def test_chatsmith_templates_refuse_tool_calls_by_name(tiny_tokenizer):
    with pytest.raises(TemplateError, match=r"chat template 'chatml' does not render tool calls"):
        render_chat(CHAT, tiny_tokenizer, "chatml", tools=TOOLS)
    with pytest.raises(TemplateError, match=r"chat template 'chatml' does not render the row's 'tools'"):
        render_chat([CHAT[0], CHAT[3]], tiny_tokenizer, "chatml", tools=TOOLS)
    # a tool result without calls renders as a turn of its own, not trained on
    plain = [CHAT[0], {"role": "tool", "content": "18 C"}, CHAT[3]]
    rendered = render_chat(plain, tiny_tokenizer, "chatml")
    assert "<|im_start|>tool\n18 C<|im_end|>" in rendered.text
    assert masked_texts(tiny_tokenizer, rendered) == [CHAT[3]["content"] + "<|im_end|>"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_with_tools_load_and_keep_their_calls(tmp_path):
    row = {"tools": TOOLS, "messages": [CHAT[0], {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}, *CHAT[2:]]}
    (ex,) = load_examples(write_rows(tmp_path / "t.jsonl", [row]), kind="chat").examples
    assert ex.tools == TOOLS and ex.meta == {}
    assert ex.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert ex.messages[2] == CHAT[2]


@pytest.mark.parametrize("row,reason", [
    ({"tools": TOOLS, "messages": [CHAT[0], CHAT[1], {"role": "tool", "name": "get_weather"}, CHAT[3]]},
     "messages[2] (tool) has no 'content'"),
    ({"tools": {"get_weather": {}}, "messages": CHAT}, "field 'tools' should be a list of tools, got an object"),
    ({"tools": [{"function": TOOLS[0]["function"]}], "messages": CHAT}, 'tools[0].type should be "function"'),
    ({"tools": [{"type": "function", "function": {"name": "get_weather"}}], "messages": CHAT},
     "tools[0].function.parameters is missing"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}], "messages": CHAT},
     "tools[0].function.name is missing"),
    ({"messages": CHAT}, "messages[1].tool_calls[0] calls 'get_weather' but the row has no 'tools' list"),
    ({"tools": TOOLS, "messages": [CHAT[0], dict(CHAT[1], tool_calls=[
        {"type": "function", "function": {"name": "get_wether", "arguments": {}}}]), *CHAT[2:]]},
     "messages[1].tool_calls[0].function.name 'get_wether' is not a function in 'tools' (get_weather)"),
    ({"tools": TOOLS, "messages": [CHAT[0], dict(CHAT[1], tool_calls=[
        {"type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]), *CHAT[2:]]},
     "messages[1].tool_calls[0].function.arguments is a string but not valid JSON"),
])
def test_bad_tool_rows_name_file_line_and_field(tmp_path, row, reason):
    path = write_rows(tmp_path / "bad.jsonl", [{"tools": TOOLS, "messages": CHAT}, row])
    with pytest.raises(DataError) as err:
        load_examples(path, kind="chat")
    assert f"{path}:2: {reason}" in str(err.value)


def test_data_check_validates_and_renders_tool_rows(tmp_path, capsys):
    from chatsmith.cli import main

    model_dir = tmp_path / "model"
    tokenizer_with("qwen2", QWEN25_TOOLS).save_pretrained(str(model_dir))
    good = write_rows(tmp_path / "good.jsonl", [{"tools": TOOLS, "messages": CHAT}] * 3)
    assert main(["data", "check", str(good), "--tokenizer", str(model_dir), "--for", "sft", "--max-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "3 conversations kept" in out, out
    bad = write_rows(tmp_path / "bad.jsonl", [{"tools": TOOLS, "messages": CHAT},
                                              {"messages": [CHAT[0], {"role": "tool"}, CHAT[3]]}])
    assert main(["data", "check", str(bad)]) != 0
    captured = capsys.readouterr()
    assert f"{bad}:2: messages[1] (tool) has no 'content'" in captured.out + captured.err


def test_sft_examples_train_on_tool_calls_not_results():
    from chatsmith.train.sft import prepare_examples

    tokenizer = tokenizer_with("qwen2", QWEN25_TOOLS)
    (example,), stats = prepare_examples([(CHAT, "row 1", TOOLS)], tokenizer, get_format(None, tokenizer), 2048)
    trained = tokenizer.decode([t for t in example.targets.tolist() if t != -100])
    assert trained == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
                       + CHAT[3]["content"] + "<|im_end|>")
    assert stats.kept == 1
