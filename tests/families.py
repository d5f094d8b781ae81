"""Tiny randomly initialised models of real architectures, each with its family's tokenizer and chat template.

    from families import FAMILIES, build_family
    model, tokenizer = build_family("qwen3")     # Qwen3ForCausalLM (hidden 64, 2 layers) + ChatML/think template

Every family (llama, qwen2, qwen3, mistral, gemma2, gemma3, phi3, gpt2, olmo2, smollm3) is built locally from
its transformers config in well under a second: nothing is downloaded. The tokenizer is a byte-level BPE
trained on a few sentences that holds the family's special tokens (bos/eos/pad as the family declares them),
and its `chat_template` is written here the way the family ships it (the published turn format: headers,
end-of-turn tokens, default system prompts, think blocks), shortened where the real one only adds features
chatsmith does not use (tools, dates). Weights are drawn with a large initializer range so that greedy
decoding has clear winners (no near-ties that float rounding could flip).

Used by tests/test_architectures.py (save, reload, sample) and tests/test_template_masks.py (masks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from conftest import SAMPLE_TEXTS

# ----------------------------------------------------------------------------- chat templates (published formats)

# Llama 3 instruct: header tokens around the role, `<|eot_id|>` ends every turn, contents trimmed.
LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Qwen2.5: ChatML with a default system prompt when the conversation has none.
QWEN2 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3: ChatML; an assistant turn after the last user query gets a think block (empty when the message has
# no reasoning), earlier ones do not; `enable_thinking=false` puts the empty block in the generation prompt.
QWEN3 = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- set reasoning_content = message.reasoning_content if message.reasoning_content is defined else '' %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Mistral instruct: `<s>[INST] user [/INST] reply</s>`; a system prompt goes into the first user turn; no
# generation prompt (the prompt ends with `[/INST]`, the model writes the space before its reply).
MISTRAL = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system_message if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Gemma 2 / Gemma 3 instruct: `<start_of_turn>user|model`, `<end_of_turn>`, contents trimmed. Gemma 2
# refuses a system message; Gemma 3 puts it at the top of the first user turn.
GEMMA2 = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Phi-3: `<|role|>\n … <|end|>\n`; a conversation that does not end in a generation prompt ends with eos.
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# GPT-2 ships no chat template: a plain "Role: text" layout closed by eos.
GPT2 = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

# OLMo 2 instruct (Tulu): `<|user|>\n … \n`, replies closed by eos, a newline between turns but not at the end.
OLMO2 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

# SmolLM3: ChatML with a metadata system block; in /no_think mode (enable_thinking=false or "/no_think" in
# the system message) every assistant turn, and the generation prompt, start with an empty think block.
SMOLLM3 = (
    "{%- if enable_thinking is not defined -%}{%- set enable_thinking = true -%}{%- endif -%}"
    "{%- set reasoning_mode = '/think' if enable_thinking else '/no_think' -%}"
    "{%- set custom_instructions = '' -%}"
    "{%- if messages[0].role == 'system' -%}"
    "{%- set system_message = messages[0].content -%}"
    "{%- if '/no_think' in system_message -%}{%- set reasoning_mode = '/no_think' -%}"
    "{%- elif '/think' in system_message -%}{%- set reasoning_mode = '/think' -%}{%- endif -%}"
    "{%- set custom_instructions = system_message.replace('/no_think', '').replace('/think', '').rstrip() -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n## Metadata\\n\\nReasoning Mode: ' + reasoning_mode -}}"
    "{{- '\\n\\n## Custom Instructions\\n\\n' -}}"
    "{%- if custom_instructions -%}{{- custom_instructions + '\\n\\n' -}}"
    "{%- else -%}{{- 'You are a helpful AI assistant named SmolLM, trained by Hugging Face.\\n\\n' -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}"
    "{{ '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' -%}"
    "{% generation %}"
    "{%- if reasoning_mode == '/think' -%}"
    "{{ '<|im_start|>assistant\\n' + message.content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>assistant\\n' + '<think>\\n\\n</think>\\n' + message.content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if reasoning_mode == '/think' -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- else -%}{{ '<|im_start|>assistant\\n' + '<think>\\n\\n</think>\\n' }}{%- endif -%}"
    "{%- endif -%}"
)


# ----------------------------------------------------------------------------- families

@dataclass
class Family:
    """How to build one family: its config class and fields, tokens and template.

    `specials`: the tokenizer's special tokens; `plain_added`: tokens added as whole, non-special tokens
    (Qwen3's `<think>`); `bos`/`eos`/`pad`: the tokenizer's declared tokens (None where the family has none);
    `end_of_turn`: the text that closes an assistant turn in the middle of a chat; `system`: whether the
    template accepts a system message.
    """

    name: str
    config: str
    model: str
    template: str
    specials: list[str]
    bos: str | None
    eos: str
    pad: str | None
    end_of_turn: str
    fields: dict = field(default_factory=dict)
    plain_added: list[str] = field(default_factory=list)
    system: bool = True


COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "LlamaConfig", "LlamaForCausalLM", LLAMA3,
           ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
           bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, end_of_turn="<|eot_id|>",
           fields=dict(COMMON, tie_word_embeddings=False)),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", QWEN2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
           bos=None, eos="<|im_end|>", pad="<|endoftext|>", end_of_turn="<|im_end|>",
           fields=dict(COMMON, tie_word_embeddings=True)),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", QWEN3, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
           bos=None, eos="<|im_end|>", pad="<|endoftext|>", end_of_turn="<|im_end|>",
           fields=dict(COMMON, head_dim=16, tie_word_embeddings=True), plain_added=["<think>", "</think>"]),
    Family("mistral", "MistralConfig", "MistralForCausalLM", MISTRAL, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
           bos="<s>", eos="</s>", pad=None, end_of_turn="</s>",
           fields=dict(COMMON, sliding_window=None, tie_word_embeddings=False)),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", GEMMA2,
           ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
           bos="<bos>", eos="<eos>", pad="<pad>", end_of_turn="<end_of_turn>", system=False,
           fields=dict(COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3,
           ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
           bos="<bos>", eos="<eos>", pad="<pad>", end_of_turn="<end_of_turn>",
           fields=dict(COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"])),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", PHI3,
           ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
           bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", end_of_turn="<|end|>",
           fields=dict(COMMON, sliding_window=None, tie_word_embeddings=False)),
    Family("gpt2", "GPT2Config", "GPT2LMHeadModel", GPT2, ["<|endoftext|>"],
           bos="<|endoftext|>", eos="<|endoftext|>", pad=None, end_of_turn="<|endoftext|>",
           fields=dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2)),
    Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", OLMO2, ["<|endoftext|>", "<|pad|>"],
           bos="<|endoftext|>", eos="<|endoftext|>", pad="<|pad|>", end_of_turn="<|endoftext|>",
           fields=dict(COMMON, tie_word_embeddings=False)),
    Family("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", SMOLLM3,
           ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"],
           bos=None, eos="<|im_end|>", pad=None, end_of_turn="<|im_end|>", plain_added=["<think>", "</think>"],
           fields=dict(COMMON, no_rope_layer_interval=2, tie_word_embeddings=True)),
]}


def build_tokenizer(family: Family, vocab_size: int = 400):
    """A byte-level BPE `PreTrainedTokenizerFast` with the family's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(family.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SAMPLE_TEXTS, trainer=trainer)
    declared = {f"{name}_token": token for name, token in (("bos", family.bos), ("eos", family.eos),
                                                            ("pad", family.pad)) if token is not None}
    if "<unk>" in family.specials:
        declared["unk_token"] = "<unk>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **declared)
    if family.plain_added:
        tokenizer.add_tokens(family.plain_added, special_tokens=False)
    tokenizer.chat_template = family.template
    return tokenizer


def build_model(family: Family, tokenizer, seed: int = 0):
    """The family's causal LM, randomly initialised (seeded), sized for `tokenizer`, in eval mode."""
    import transformers

    fields = dict(family.fields, vocab_size=len(tokenizer))
    for name in ("bos", "eos", "pad"):
        fields[f"{name}_token_id"] = getattr(tokenizer, f"{name}_token_id", None)
    config = getattr(transformers, family.config)(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, family.model)(config)
    return model.eval()


def build_family(name: str, seed: int = 0):
    """(model, tokenizer) of family `name`."""
    family = FAMILIES[name]
    tokenizer = build_tokenizer(family)
    return build_model(family, tokenizer, seed), tokenizer
