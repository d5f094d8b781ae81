"""Shared fixtures: tiny tokenizers and models built locally (no downloads)."""

from __future__ import annotations

import os

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
