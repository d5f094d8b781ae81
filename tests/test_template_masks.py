"""Assistant masks on the chat templates real model families ship (tests/families.py, plus gpt-oss here).

For every assistant turn k of a conversation, the mask must cover exactly what the model generates after
that turn's prompt (the conversation before it, generation prompt appended) up to and including the turn's
end-of-turn marker: text the template writes between the generation prompt and the reply (Qwen3's empty
think block, gpt-oss's final channel) is generated, so it is masked unless the generation prompt already
holds it; an earlier turn stops at its own end-of-turn even where the final turn is closed differently
(Phi-3's extra eos, gpt-oss's `<|return|>`), never covering the next user's header. The expectations are
stated per template below, independently of chatsmith, and checked against transformers' rendering.

Run: `python -m pytest tests/test_template_masks.py -q`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsmith.chat import ChatFormat, get_format, render_chat, render_prompt
from chatsmith.generate import chat_sampling_config
from families import FAMILIES, Family, build_tokenizer

# gpt-oss (harmony format), without tools and reasoning: a fixed system message, the conversation's system
# prompt as developer instructions, replies on the final channel; the last reply of a finished conversation is
# closed with `<|return|>` (what the model emits at the end of its answer), earlier ones with `<|end|>`.
GPT_OSS = (
    "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n"
    "Knowledge cutoff: 2024-06\\n\\nReasoning: medium\\n\\n# Valid channels: analysis, commentary, final. "
    "Channel must be included for every message.<|end|>' -}}"
    "{%- if messages[0].role == 'system' -%}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + messages[0].content + '\\n\\n<|end|>' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message.role == 'user' -%}"
    "{{- '<|start|>user<|message|>' + message.content + '<|end|>' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- if loop.last and not add_generation_prompt -%}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|return|>' -}}"
    "{%- else -%}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}"
)
GPT_OSS_FAMILY = Family("gpt_oss", "", "", GPT_OSS, ["<|endoftext|>", "<|start|>", "<|message|>", "<|channel|>",
                                                      "<|end|>", "<|return|>"],
                        bos=None, eos="<|return|>", pad="<|endoftext|>", end_of_turn="<|end|>")
QWEN3_THINK = "<think>\n\n</think>\n\n"


@dataclass
class Expect:
    """What a template's masks must be, stated from its published format.

    `generated(k, n)`: text the model writes before reply k of n messages (after the generation prompt);
    `final_end`: the last reply's closing when the conversation ends there, if not `family.end_of_turn`;
    `header`: unmasked text between the prompt and the reply (a template without a generation prompt);
    `prefix_turns`: whether every turn's prompt is a prefix of the conversation (not so where the
    generation prompt holds text that earlier turns do not: Qwen3 with thinking off); `stops`: the derived
    stop strings; `variables`: extra template variables (`enable_thinking`); `system_switch`: text that
    switches the template's mode when a system message contains it (and is cut out of it: a rewrite,
    which chatsmith refuses), kept out of the generated system messages.
    """

    family: Family
    generated: Callable[[int, int], str] = lambda k, n: ""
    final_end: str | None = None
    header: str = ""
    prefix_turns: bool = True
    stops: list[str] | None = None
    variables: dict = field(default_factory=dict)
    system_switch: str | None = None


EXPECT = {name: Expect(family) for name, family in FAMILIES.items()}
EXPECT["qwen3"].generated = lambda k, n: QWEN3_THINK if k == n - 1 else ""   # the turn after the last query
EXPECT["qwen3_no_think"] = Expect(FAMILIES["qwen3"], prefix_turns=False, variables={"enable_thinking": False})
EXPECT["smollm3_no_think"] = Expect(FAMILIES["smollm3"], variables={"enable_thinking": False})
EXPECT["smollm3"].system_switch = EXPECT["smollm3_no_think"].system_switch = "/think"   # also "/no_think"
EXPECT["mistral"].header = " "
EXPECT["gpt_oss"] = Expect(GPT_OSS_FAMILY, generated=lambda k, n: "<|channel|>final<|message|>",
                           final_end="<|return|>", stops=["<|end|>", "<|return|>"])


@pytest.fixture(scope="module")
def tokenizers():
    """Family name -> its tokenizer, built on first use."""
    return {}


def template_for(name, tokenizers):
    """`(Expect, tokenizer, ChatFormat)` of template `name` (its extra variables bound, if any)."""
    expect = EXPECT[name]
    family = expect.family
    if family.name not in tokenizers:
        tokenizers[family.name] = build_tokenizer(family)
    tok = tokenizers[family.name]
    fmt = get_format(None, tok)
    if expect.variables:
        fmt = ChatFormat(name, family.template, fmt.bos_token, fmt.eos_token,
                         template_vars=dict(fmt.template_vars, **expect.variables))
    return expect, tok, fmt


TRICKY = ["<|im_end|>", "<|end|>", "<|return|>", "<|start|>", "<|eot_id|>", "<end_of_turn>", "</s>", "[INST]",
          "<think>", "</think>", "<|endoftext|>", "User:", "\n", " ", "Paris", " the", "é", "東京", "🙂"]
content_st = st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=5)), max_size=5).map(
    lambda parts: "".join(parts).strip())


@st.composite
def conversations(draw, expect: Expect):
    """Optional system message, then user/assistant alternating from user; contents without surrounding
    whitespace (how each template treats that is tested in test_chat_templates.py)."""
    messages = []
    if expect.family.system and draw(st.booleans()):
        switch = expect.system_switch
        messages.append({"role": "system", "content": draw(content_st.filter(lambda c: not switch or switch not in c))})
    for turn in range(draw(st.integers(1, 6))):
        messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": draw(content_st)})
    return messages


def masked_runs(mask):
    """[(start, end)] of the maximal runs of mask == 1."""
    runs, start = [], None
    for t, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append((start, t))
            start = None
    return runs


def check_masks(expect: Expect, tok, fmt, messages, add_generation_prompt: bool):
    r = render_chat(messages, tok, fmt, add_generation_prompt=add_generation_prompt)
    assert r.text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=expect.family.template, **expect.variables)
    assert tok.decode(r.input_ids, skip_special_tokens=False) == r.text
    runs = masked_runs(r.assistant_mask)
    n = len(messages)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(runs) == len(turns)
    for k, (start, end) in zip(turns, runs):
        final = k == n - 1 and not add_generation_prompt
        closing = expect.final_end if final and expect.final_end else expect.family.end_of_turn
        masked = expect.generated(k, n) + messages[k]["content"] + closing
        assert tok.decode(r.input_ids[start:end], skip_special_tokens=False) == masked
        prompt = fmt.render_text(messages[:k], add_generation_prompt=True)
        if expect.prefix_turns or k == n - 1:
            # the mask starts right where the turn's prompt ends (after any header the prompt lacks)
            assert tok.decode(r.input_ids[:start], skip_special_tokens=False) == prompt + expect.header
    return r


NAMES = list(EXPECT)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), add_generation_prompt=st.booleans())
def test_masks_cover_what_each_turn_generates(tokenizers, name, data, add_generation_prompt):
    expect, tok, fmt = template_for(name, tokenizers)
    messages = data.draw(conversations(expect))
    check_masks(expect, tok, fmt, messages, add_generation_prompt)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_prompt_ids_are_a_prefix_of_training_ids(tokenizers, name, data):
    """What the model is trained on after a prompt is what it generates after that prompt at inference."""
    expect, tok, fmt = template_for(name, tokenizers)
    messages = data.draw(conversations(expect))
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "next"})
    reply = data.draw(content_st)
    prompt = render_prompt(messages, tok, fmt)
    full = render_chat(messages + [{"role": "assistant", "content": reply}], tok, fmt)
    assert full.input_ids[:len(prompt)] == prompt
    new, new_mask = full.input_ids[len(prompt):], full.assistant_mask[len(prompt):]
    header = len(tok.encode(expect.header, add_special_tokens=False)) if expect.header else 0
    m = sum(new_mask)
    # one run, right after the prompt (and any header it lacks); what follows the turn is not trained on
    assert new_mask == [0] * header + [1] * m + [0] * (len(new) - header - m)
    closing = expect.final_end or expect.family.end_of_turn
    expected = expect.generated(len(messages), len(messages) + 1) + reply + closing
    assert tok.decode(new[header:header + m], skip_special_tokens=False) == expected


@pytest.mark.parametrize("name", NAMES)
def test_stop_strings_end_a_turn_in_the_middle_of_a_chat(tokenizers, name):
    expect, tok, fmt = template_for(name, tokenizers)
    end_of_turn = expect.family.end_of_turn
    assert fmt.stop_strings == (expect.stops or [end_of_turn])
    cfg = chat_sampling_config(fmt, tok)
    assert tok.convert_tokens_to_ids(end_of_turn) in cfg.stop_token_ids
    # In a rendered chat, what follows an earlier reply starts with a stop string (so generation stops there).
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    text = fmt.render_text(messages)
    after = text[text.index("Hello!") + len("Hello!"):]
    assert any(after.startswith(stop) for stop in cfg.stop_strings)
    assert after.startswith(end_of_turn)


def test_phi3_final_eos_is_not_part_of_the_turn(tokenizers):
    expect, tok, fmt = template_for("phi3", tokenizers)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    r = render_chat(messages, tok, fmt)
    assert r.text.endswith("See you.<|end|>\n<|endoftext|>")
    masked = [tok.decode(r.input_ids[a:b], skip_special_tokens=False) for a, b in masked_runs(r.assistant_mask)]
    assert masked == ["Hello!<|end|>", "See you.<|end|>"]


def test_gpt_oss_turns_close_with_their_own_markers(tokenizers):
    expect, tok, fmt = template_for("gpt_oss", tokenizers)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    r = render_chat(messages, tok, fmt)
    masked = [tok.decode(r.input_ids[a:b], skip_special_tokens=False) for a, b in masked_runs(r.assistant_mask)]
    assert masked == ["<|channel|>final<|message|>Hello!<|end|>", "<|channel|>final<|message|>See you.<|return|>"]


def test_qwen3_think_block_is_trained_unless_the_prompt_holds_it(tokenizers):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    for name, last in (("qwen3", QWEN3_THINK + "See you.<|im_end|>"), ("qwen3_no_think", "See you.<|im_end|>")):
        expect, tok, fmt = template_for(name, tokenizers)
        r = render_chat(messages, tok, fmt)
        assert QWEN3_THINK + "See you." in r.text   # the template writes the block in both modes
        masked = [tok.decode(r.input_ids[a:b], skip_special_tokens=False) for a, b in masked_runs(r.assistant_mask)]
        assert masked == ["Hello!<|im_end|>", last]


def test_reasoning_is_trained_where_the_template_writes_it(tokenizers):
    """`reasoning_content`: Qwen3's template writes it itself (latest turn only) and it is in the mask; ChatML,
    which knows nothing of reasoning, gets it folded into the reply as a think block, also in the mask."""
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "reasoning_content": "A greeting."},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "See you.", "reasoning_content": "They leave."}]
    expect, tok, fmt = template_for("qwen3", tokenizers)
    r = render_chat(messages, tok, fmt)
    masked = [tok.decode(r.input_ids[a:b], skip_special_tokens=False) for a, b in masked_runs(r.assistant_mask)]
    assert masked == ["Hello!<|im_end|>", "<think>\nThey leave.\n</think>\n\nSee you.<|im_end|>"]
    assert "A greeting." not in r.text           # Qwen3 drops the reasoning of turns before the last query
    tok = build_tokenizer(FAMILIES["qwen2"])
    r = render_chat(messages, tok, get_format("chatml"))
    masked = [tok.decode(r.input_ids[a:b], skip_special_tokens=False) for a, b in masked_runs(r.assistant_mask)]
    assert masked == ["<think>\nA greeting.\n</think>\n\nHello!<|im_end|>",
                      "<think>\nThey leave.\n</think>\n\nSee you.<|im_end|>"]
    with pytest.raises(Exception, match="reasoning_content"):
        render_chat([{"role": "user", "content": "Hi", "reasoning_content": "no"}], tok, get_format("chatml"))
