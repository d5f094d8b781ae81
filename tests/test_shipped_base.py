"""The base model shipped in the package: it matches the world's corpus and tokenizer (so it can never go
stale silently), it is small, and the quick demo starts from it (the full profile and --pretrain do not)."""

from __future__ import annotations

import json

import pytest
import torch

from chatsmith.world import demo as D
from chatsmith.world.shipped import SHIPPED_DIR, file_sha256, read_manifest, shipped_base_for

pytestmark = pytest.mark.skipif(read_manifest() is None, reason="no shipped base model in this checkout")


@pytest.fixture(scope="module")
def quick_demo_pretrain(tmp_path_factory):
    """The quick demo run up to its pretrain stage (the world's export, then the shipped base installed)."""
    out = tmp_path_factory.mktemp("demo")
    assert D.run_demo(D.DemoConfig(out=str(out), profile="quick", until="pretrain", cache=False)) == 0
    return out


def test_the_shipped_base_was_pretrained_on_the_worlds_corpus(quick_demo_pretrain):
    corpus = quick_demo_pretrain / "data" / "corpus.jsonl"
    manifest = read_manifest()
    assert shipped_base_for(corpus) == SHIPPED_DIR, (
        f"the world's corpus (sha256 {file_sha256(corpus)}) is not the one the shipped base model was pretrained on "
        f"({manifest['corpus_sha256']}): pretrain it again with the recipe in its manifest and ship it "
        "(docs/EXPERIMENTS.md says how)")
    assert manifest["recipe"]["max_steps"] == D.PROFILES["full"]["pretrain"]["max_steps"]


def test_the_shipped_tokenizer_is_the_one_pretraining_would_train(quick_demo_pretrain):
    from transformers import AutoTokenizer

    from chatsmith.model import build_tokenizer
    from chatsmith.train.pretrain import PretrainConfig, read_corpus, split_documents

    recipe = read_manifest()["recipe"]
    defaults = PretrainConfig()
    texts = read_corpus(str(quick_demo_pretrain / "data" / "corpus.jsonl"))
    train, _ = split_documents(texts, recipe.get("eval_fraction", defaults.eval_fraction), recipe.get("seed", 0))
    trained = build_tokenizer(train, 4096, recipe.get("template", defaults.template))
    shipped = AutoTokenizer.from_pretrained(str(SHIPPED_DIR))
    assert trained.get_vocab() == shipped.get_vocab()
    assert trained.chat_template == shipped.chat_template


def test_the_shipped_base_is_small():
    size = sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MiB"


def test_quick_starts_from_the_shipped_base(quick_demo_pretrain, tmp_path):
    from safetensors.torch import load_file

    base = quick_demo_pretrain / "base"
    installed = load_file(str(base / "model.safetensors"))
    shipped = load_file(str(SHIPPED_DIR / "model.safetensors"))
    assert set(installed) == set(shipped)
    for name, tensor in installed.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, shipped[name].float()), name
    marker = json.loads((quick_demo_pretrain / ".demo" / "pretrain.json").read_text())
    assert marker["cached"] is True
    assert json.loads((base / "shipped_base.json").read_text())["corpus_sha256"] == read_manifest()["corpus_sha256"]

    # Another corpus (a changed world), --pretrain, or the full profile: no shipped base.
    other = tmp_path / "corpus.jsonl"
    other.write_text('{"text": "another world"}\n', encoding="utf-8")
    assert shipped_base_for(other) is None
    paths = D._Paths(quick_demo_pretrain)
    logged: list[str] = []
    assert D._shipped_base(D.DemoConfig(profile="quick"), paths, logged.append) == SHIPPED_DIR
    assert D._shipped_base(D.DemoConfig(profile="quick", pretrain=True), paths, logged.append) is None
    assert D._shipped_base(D.DemoConfig(profile="full"), paths, logged.append) is None
    assert logged == []
    assert D._shipped_base(D.DemoConfig(profile="quick"), D._Paths(tmp_path), logged.append) is None
    assert "pretraining one from scratch" in logged[0]


def test_the_demo_eval_budget_fits_every_demonstration_reply(quick_demo_pretrain):
    """A reply as long as the world's own demonstrations must be able to end its turn in the demo's eval:
    else ends_turn counts a copied training reply as a model that never stops."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_DIR))
    longest = 0
    with open(quick_demo_pretrain / "data" / "sft.jsonl") as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                if message["role"] == "assistant":
                    # + 1: the end-of-turn token
                    longest = max(longest, len(tokenizer(message["content"])["input_ids"]) + 1)
    assert longest > 48                 # the three-step how-to replies: the case this guards
    for profile in ("quick", "full"):
        assert D.PROFILES[profile]["eval"]["max_new_tokens"] >= longest, profile
