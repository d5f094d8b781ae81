"""Shared fixtures and helpers: tiny tokenizers and models built locally (no downloads), JSONL files.

Helpers the test modules import (`from conftest import ...`): `make_tokenizer`, `tiny_llama_config`,
`write_jsonl`, `write_tiny_run_inputs`, `run_chat_cli`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SAMPLE_TEXTS = [
    "The capital of France is Paris. Paris is in Europe and people there speak French.",
    "What is the capital of Germany? What is the capital of Italy? Write a haiku about the sea.",
    "Python is a snake. Python is also a programming language. Java is an island and a language.",
    "2 + 2 = 4. 3 + 5 = 8. Hello, how can I help you today? I'm sorry, I can't help with that.",
    "Café, naïve, 東京, emoji 🙂 — unicode text must round-trip through the tokenizer exactly.",
] * 4

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|endoftext|>"]


def make_tokenizer(vocab_size: int = 400, special_tokens=None):
    """A byte-level BPE PreTrainedTokenizerFast trained on SAMPLE_TEXTS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens or SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SAMPLE_TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="</s>", bos_token="<s>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`), as
    `chatsmith serve` uses on 2 cores: OpenMP threads spinning on a busy machine made the serving tests 10x
    slower. The previous count is restored for the modules after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chatml_tok():
    """A small ChatML tokenizer trained on SAMPLE_TEXTS (the serving and batching tests)."""
    from chatsmith.model import build_tokenizer

    return build_tokenizer(SAMPLE_TEXTS, 400, "chatml")


@pytest.fixture(scope="module")
def induction_llama(chatml_tok):
    """A 2-layer Llama with the induction init: it copies earlier context, so greedy outputs differ by prompt
    (a plain random model repeats one token whatever the prompt, which would make comparisons weak)."""
    import torch

    from chatsmith.model import create_model

    torch.manual_seed(0)
    return create_model(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, max_position_embeddings=256), chatml_tok, init="induction").eval()


def write_jsonl(path: Path, rows) -> str:
    """One JSON object a line (a str row is written as it is: a broken line for the error tests); returns
    the path as a str."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def tiny_llama_config(tokenizer, **kw):
    """A 2-layer Llama config (hidden 32, 4 heads, 2 KV heads, context 256, tied embeddings) for `tokenizer`."""
    import transformers

    return transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                    tie_word_embeddings=True, **kw)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer):
    """A copy of `tiny_tokenizer` with the built-in chatml template."""
    import copy

    from chatsmith.chat.templates import BUILTIN_TEMPLATES

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = BUILTIN_TEMPLATES["chatml"]
    return tok


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, chat_tokenizer) -> str:
    """A tiny causal LM directory (what `chatsmith sft` writes): `tiny_llama_config`, random weights drawn at
    seed 0, the chatml template. One per test module."""
    import torch
    import transformers

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sft")
    transformers.LlamaForCausalLM(tiny_llama_config(chat_tokenizer)).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return str(path)


# Twelve two-turn arithmetic chats: the SFT data of the command-line tests.
ARITHMETIC_CHATS = [[{"role": "user", "content": f"What is {i} + {i}?"},
                     {"role": "assistant", "content": f"It is {2 * i}."}] for i in range(12)]


def write_tiny_run_inputs(root: Path, reward_model: bool = False) -> Path:
    """What a training command needs, under root: model/ (a 2-layer Llama, hidden 32, context 128, random
    weights drawn at seed 0, with `make_tokenizer()`), sft.jsonl (ARITHMETIC_CHATS) and, with reward_model,
    rm/ (a sequence-classification model of the same shape, drawn right after). Returns root."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    if reward_model:
        config.num_labels = 1
        LlamaForSequenceClassification(config).save_pretrained(str(root / "rm"))
        tok.save_pretrained(str(root / "rm"))
    write_jsonl(root / "sft.jsonl", [{"messages": chat} for chat in ARITHMETIC_CHATS])
    return root


def run_chat_cli(cfg, text: str, monkeypatch) -> tuple[str, str, list[list[dict]]]:
    """Run `chatsmith chat` (`generate.terminal.chat_cli`, config `cfg`) on `text` as stdin and assert it exits 0;
    returns (stdout, stderr, a copy of every message list it rendered a prompt from, in order)."""
    import io

    import chatsmith.generate.terminal as terminal

    seen = []
    real = terminal.render_prompt

    def spy(messages, tokenizer, fmt):
        seen.append([dict(m) for m in messages])
        return real(messages, tokenizer, fmt)

    monkeypatch.setattr(terminal, "render_prompt", spy)
    out, err = io.StringIO(), io.StringIO()
    assert terminal.chat_cli(cfg, stdin=io.StringIO(text), stdout=out, stderr=err) == 0
    return out.getvalue(), err.getvalue(), seen
