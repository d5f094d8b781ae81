"""Tests for the pretrain and sft stages: assistant-only targets, packing equivalence, target-only LM head,
length policy, stream packing, and a tiny end-to-end pretrain -> sft run.

Run: python -m pytest tests/test_pretrain_sft.py -x -q
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from chatsmith.train.supervised import lm_loss_on_targets
from chatsmith.train.pretrain import pack_stream
from chatsmith.train.sft import SFTCollator, assistant_loss, prepare_examples, shift_mask_to_targets

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Capital of Germany?"},
     {"role": "assistant", "content": "Berlin"},
     {"role": "user", "content": "And Italy?"},
     {"role": "assistant", "content": "Rome, of course."}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam\nsalt wind carries gull voices\nthe tide keeps its time"}],
    [{"role": "user", "content": "Python?"},
     {"role": "assistant", "content": "Do you mean the snake or the programming language?"}],
]


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512))


@pytest.fixture(scope="module")
def chatml():
    from chatsmith.chat.templates import get_format

    return get_format("chatml")


def examples(tok, fmt, max_len=512, policy="truncate"):
    return prepare_examples([(c, f"conv#{i}") for i, c in enumerate(CONVERSATIONS)], tok, fmt, max_len, policy)


def test_targets_are_exactly_the_assistant_replies_and_end_of_turn(tiny_tokenizer, chatml):
    exs, stats = examples(tiny_tokenizer, chatml)
    assert stats.kept == len(CONVERSATIONS) and stats.truncated == 0
    for ex, conv in zip(exs, CONVERSATIONS):
        ids, targets = ex.input_ids.tolist(), ex.targets.tolist()
        kept = [j for j, t in enumerate(targets) if t != -100]
        assert all(targets[j] == ids[j + 1] for j in kept)          # next-token alignment
        want = "".join(m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant")
        assert tiny_tokenizer.decode([targets[j] for j in kept]) == want
    assert shift_mask_to_targets([5, 6, 7, 8], [0, 1, 1, 0]) == [6, 7, -100, -100]


def test_overlength_truncates_at_turn_boundary_or_drops(tiny_tokenizer, chatml):
    full, _ = examples(tiny_tokenizer, chatml)
    long_len = len(full[1].input_ids)
    first_turn = [i for i, t in enumerate(full[1].targets.tolist()) if t != -100]
    # A limit that fits the first exchange of conversation 1 but not the second.
    limit = long_len - 3
    exs, stats = examples(tiny_tokenizer, chatml, max_len=limit)
    assert stats.truncated >= 1
    cut = next(e for e in exs if e.origin == "conv#1")
    text = tiny_tokenizer.decode([t for t in cut.targets.tolist() if t != -100])
    assert text == "Berlin<|im_end|>" and len(cut.input_ids) <= limit and first_turn
    exs, stats = examples(tiny_tokenizer, chatml, max_len=limit, policy="drop")
    assert "conv#1" not in {e.origin for e in exs} and stats.dropped_long >= 1


def test_target_only_head_equals_full_logits_loss(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    targets = torch.randint(0, len(tiny_tokenizer), (2, 12))
    targets[0, :5] = -100
    targets[1, 9:] = -100
    got, n = lm_loss_on_targets(model, ids, targets)
    logits = model(input_ids=ids).logits
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    assert n == int((targets != -100).sum())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_batch_loss_equals_unpacked(tiny_tokenizer, chatml):
    exs, _ = examples(tiny_tokenizer, chatml)
    model = tiny_llama(len(tiny_tokenizer)).eval()
    packed = SFTCollator(tiny_tokenizer.pad_token_id, 256, packing=True)(exs)
    padded = SFTCollator(tiny_tokenizer.pad_token_id, 256, packing=False)(exs)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["attention_mask"] is not None and padded["attention_mask"] is None
    assert packed["n_targets"] == padded["n_targets"] and packed["n_tokens"] == padded["n_tokens"]
    # Position ids restart at 0 for every conversation of a packed row.
    assert int((packed["position_ids"] == 0).sum()) >= len(exs)
    with torch.no_grad():
        lp, n1, _ = assistant_loss(model, packed)
        lu, n2, _ = assistant_loss(model, padded)
    assert n1 == n2
    torch.testing.assert_close(lp, lu, rtol=1e-5, atol=1e-4)


def test_pack_stream_rows_share_one_token_and_shift_targets(tiny_tokenizer):
    texts = ["The capital of France is Paris.", "Python is a snake.", "2 + 2 = 4."] * 5
    rows = pack_stream(texts, tiny_tokenizer, max_len=16)
    assert rows.shape[1] == 17
    assert torch.equal(rows[:-1, -1], rows[1:, 0])                  # consecutive rows overlap by one token
    from chatsmith.train.pretrain import document_separator_id
    sep = document_separator_id(tiny_tokenizer)
    assert sep == tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert int((rows[:, :-1] == sep).sum()) >= 10


def test_pretrain_then_sft_end_to_end(tmp_path, capsys):
    pytest.importorskip("chatsmith.model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatsmith.model import PRESETS
    from chatsmith.train.pretrain import PretrainConfig, pretrain
    from chatsmith.train.sft import SFTConfig, sft
    from chatsmith.utils import read_metrics

    corpus = tmp_path / "corpus.jsonl"
    texts = [f"The capital of country {i} is city {i}. People in country {i} speak language {i}." for i in range(40)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 4))
    preset = dict(PRESETS["tiny"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1)
    import chatsmith.model as model_module

    PRESETS_BACKUP = dict(model_module.PRESETS)
    model_module.PRESETS["test-micro"] = preset
    try:
        base = pretrain(PretrainConfig(data=str(corpus), preset="test-micro", vocab_size=300, out=str(tmp_path / "base"),
                                       max_steps=6, batch_size=4, max_len=32, warmup_steps=2, device="cpu",
                                       log_every=1, progress=False, eval_fraction=0.1))
    finally:
        model_module.PRESETS.clear()
        model_module.PRESETS.update(PRESETS_BACKUP)
    assert base.step == 6
    losses = [r["loss"] for r in read_metrics(tmp_path / "base") if "loss" in r]
    assert losses[-1] < losses[0]
    result = sft(SFTConfig(model=str(tmp_path / "base"), data=str(sft_data), template="chatml",
                           out=str(tmp_path / "sft"), max_steps=4, batch_size=4, warmup_steps=1, device="cpu",
                           log_every=1, progress=False, eval_fraction=0.0, pretrain_data=str(corpus), pretrain_mix=0.5))
    assert result.step == 4
    err = capsys.readouterr().err
    assert "16 conversations kept" in err and "mixed in 16 documents" in err
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sft"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "sft"))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert model.config.vocab_size >= len(tok) - 1
    assert (tmp_path / "sft" / "checkpoint" / "state.pt").is_file()   # the final save keeps the run files
    rows = read_metrics(tmp_path / "sft")
    assert all(r["stage"] == "sft" for r in rows) and rows[-1]["n_targets"] > 0


def test_neftune_noise_only_while_training_and_of_the_papers_size():
    from chatsmith.train.neftune import add_neftune

    model = tiny_llama(64)
    ids = torch.randint(0, 64, (2, 10))
    clean = model.get_input_embeddings()(ids).detach()
    handle = add_neftune(model, alpha=5.0)
    embed = model.get_input_embeddings()
    noisy = embed.train()(ids).detach()
    bound = 5.0 / (10 * 32) ** 0.5                  # alpha / sqrt(t * d): t = 10 tokens, d = hidden 32
    delta = (noisy - clean).abs()
    assert 0.5 * bound < delta.max() <= bound + 1e-6 and delta.mean() > 0.3 * bound
    torch.testing.assert_close(embed.eval()(ids), clean)           # eval mode: untouched
    handle.remove()
    torch.testing.assert_close(embed.train()(ids), clean)          # removed: untouched
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        add_neftune(model, alpha=0.0)


def test_pretraining_documents_train_every_token_and_mix_in_their_share(tmp_path, tiny_tokenizer):
    from chatsmith.train.sft import SFTConfig, document_examples, pretraining_mix

    texts = [f"The capital of country {i} is city {i}." for i in range(7)]
    [ex] = document_examples(texts[:1], tiny_tokenizer, max_len=512, origin="corpus.jsonl")
    ids, targets = ex.input_ids.tolist(), ex.targets.tolist()
    end_of_text = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tiny_tokenizer.decode(ids[:-1]) == texts[0] and ids[-1] == end_of_text
    assert targets == ids[1:] + [-100]                                  # every next token, then nothing
    [cut] = document_examples(texts[:1], tiny_tokenizer, max_len=5, origin="c")
    assert len(cut.input_ids) == 5

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = SFTConfig(pretrain_data=str(corpus), pretrain_mix=0.2, max_len=64)
    docs = pretraining_mix(cfg, n_chats=40, tokenizer=tiny_tokenizer)   # 10 / (40 + 10) = 0.2
    assert len(docs) == 10
    seen = [tiny_tokenizer.decode(d.input_ids[:-1].tolist()) for d in docs]
    assert set(seen[:7]) == set(texts)                                 # the whole corpus before any repeat
    assert seen == [tiny_tokenizer.decode(d.input_ids[:-1].tolist())   # the same draw for the same seed
                    for d in pretraining_mix(cfg, 40, tiny_tokenizer)]
    assert pretraining_mix(cfg, n_chats=1, tokenizer=tiny_tokenizer) == []   # 0.25 of a document rounds to none
