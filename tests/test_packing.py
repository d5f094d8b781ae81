"""Packing: best-fit bins, packed batches, and packed == unpacked on a tiny random Llama.

Run: python -m pytest tests/test_packing.py -q
"""

from __future__ import annotations

import random

import pytest
import torch

from chatsmith.data.packing import (IGNORE_INDEX, block_causal_mask, collate_packed, collate_padded,
                                    pack_sequences, packing_efficiency, shifted_token_loss)
from chatsmith.errors import ChatsmithError

VOCAB, PAD = 64, 0


def tiny_llama(impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=PAD, attn_implementation=impl)
    return LlamaForCausalLM(cfg).eval()


def random_conversations(n: int, seed: int, max_tokens: int = 20) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) pairs: a prompt part (mask 0) then alternating assistant (1) / user (0) spans."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, max_tokens)
        ids = [rng.randint(1, VOCAB - 1) for _ in range(length)]
        mask, on = [], 0
        for i in range(length):
            if i >= 2 and rng.random() < 0.3:
                on = 1 - on
            mask.append(on)
        mask[-1] = 1   # every conversation ends with an assistant token
        out.append((ids, mask))
    return out


# ----------------------------------------------------------------------------- bins

def test_pack_sequences_best_fit_is_complete_and_within_capacity():
    rng = random.Random(1)
    lengths = [rng.randint(1, 50) for _ in range(300)]
    bins = pack_sequences(lengths, 64)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    lower_bound = -(-sum(lengths) // 64)
    assert len(bins) <= lower_bound * 11 / 9 + 1     # BFD guarantee
    assert packing_efficiency(lengths, bins, 64) > 0.9
    assert pack_sequences(lengths, 64) == bins         # deterministic


def test_pack_sequences_best_fit_picks_tightest_bin():
    # 7 -> A (room 3); 4, 4 -> B (room 2); each 1 goes to the tightest bin B, where first-fit would
    # have put it in A.
    assert pack_sequences([7, 4, 4, 1, 1], 10) == [[0], [1, 2, 3, 4]]


def test_pack_sequences_seeded_shuffle_and_errors():
    lengths = [3, 7, 2, 9, 4, 4, 1, 8]
    a, b = pack_sequences(lengths, 10, seed=5), pack_sequences(lengths, 10, seed=5)
    assert a == b and sorted(map(sorted, a)) == sorted(map(sorted, pack_sequences(lengths, 10)))
    with pytest.raises(ChatsmithError, match="fit_to_length"):
        pack_sequences([3, 11], 10)
    with pytest.raises(ChatsmithError):
        pack_sequences([0], 10)
    assert pack_sequences([], 10) == []


# ----------------------------------------------------------------------------- batches

def test_collate_packed_positions_labels_and_mask():
    seqs = [([5, 6, 7], [0, 1, 1]), ([8, 9], [1, 1]), ([10, 11, 12, 13], [0, 0, 1, 1])]
    batch = collate_packed([[seqs[0], seqs[1]], [seqs[2]]], pad_id=PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, PAD]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.seq_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    # first token of every conversation and padding never carry loss
    assert batch.labels.tolist() == [[-100, 6, 7, -100, 9], [-100, -100, 12, 13, -100]]
    assert batch.n_target_tokens == 5
    mask = batch.attention_mask
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    same = batch.seq_ids[:, :, None] == batch.seq_ids[:, None, :]
    assert not (mask[:, 0] & ~same).any()                          # never across a boundary
    assert not torch.triu(mask[:, 0].float(), diagonal=1).any()    # causal
    assert mask[1, 0, 4].tolist() == [False, False, False, False, True]   # pad sees only itself
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True]
    padded = collate_packed([[seqs[1]]], pad_id=PAD, pad_to=4)
    assert padded.input_ids.shape == (1, 4)
    with pytest.raises(ChatsmithError):
        collate_packed([[seqs[2]]], pad_id=PAD, pad_to=3)


def test_block_causal_mask_matches_bruteforce():
    seq_ids = torch.tensor([[0, 0, 1, 1, 1, 2, -1, -1]])
    mask = block_causal_mask(seq_ids)[0, 0]
    for i in range(8):
        for j in range(8):
            want = (i == j) if seq_ids[0, i] < 0 else (j <= i and bool(seq_ids[0, i] == seq_ids[0, j]))
            assert bool(mask[i, j]) == want


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_loss_and_logits_equal_unpacked(impl):
    model = tiny_llama(impl)
    seqs = random_conversations(9, seed=3, max_tokens=20)
    max_len = 40
    bins = pack_sequences([len(ids) for ids, _ in seqs], max_len)
    assert len(bins) < len(seqs)    # really packed several conversations per row
    rows = [[seqs[i] for i in b] for b in bins]
    packed = collate_packed(rows, PAD, pad_to=max_len)
    unpacked = collate_padded(seqs, PAD)
    with torch.no_grad():
        packed_logits = model(**packed.model_inputs(impl)).logits
        unpacked_logits = model(**unpacked.model_inputs(impl)).logits

    # logits at every real position match the conversation run alone
    worst = 0.0
    for r, b in enumerate(bins):
        pos = 0
        for i in b:
            n = len(seqs[i][0])
            diff = (packed_logits[r, pos:pos + n] - unpacked_logits[i, :n]).abs().max().item()
            worst = max(worst, diff)
            pos += n
    assert worst < 1e-5, worst

    p_sum, p_n = shifted_token_loss(packed_logits, packed.labels)
    u_sum, u_n = shifted_token_loss(unpacked_logits, unpacked.labels)
    expected_n = sum(sum(mask[1:]) for _, mask in seqs)
    assert p_n == u_n == expected_n
    assert abs(p_sum.item() / p_n - u_sum.item() / u_n) < 1e-5
    # ... and the labels are exactly HF's own convention: the built-in loss agrees
    hf = model(**packed.model_inputs(impl), labels=packed.labels).loss
    assert abs(hf.item() - p_sum.item() / p_n) < 1e-5


def test_transformers_mask_facts_documented_in_packing():
    """The facts packing.py's docstring states about transformers' handling of packed inputs."""
    a, b = random_conversations(2, seed=7, max_tokens=12)
    packed = collate_packed([[a, b]], PAD)
    n_a = len(a[0])
    for impl in ("sdpa", "eager"):
        model = tiny_llama(impl)
        with torch.no_grad():
            alone_b = model(torch.tensor([b[0]])).logits[0]

            def leak(**kwargs) -> float:
                out = model(packed.input_ids, **kwargs).logits[0, n_a:]
                return (out - alone_b).abs().max().item()

            additive = packed.model_inputs("eager")["attention_mask"]
            assert additive.dtype == torch.float32
            assert leak(position_ids=packed.position_ids, attention_mask=additive) < 1e-5
            bool_error = leak(position_ids=packed.position_ids, attention_mask=packed.attention_mask)
            if impl == "sdpa":
                assert bool_error < 1e-5          # sdpa takes the boolean mask
            else:
                assert bool_error > 1e-3          # eager silently adds True as +1: wrong
            # position ids alone isolate only without a cache; the default use_cache=True leaks.
            assert leak(position_ids=packed.position_ids) > 1e-3
            assert leak(position_ids=packed.position_ids, use_cache=False) < 1e-5


def test_shifted_token_loss_ignores_everything_but_targets():
    logits = torch.randn(1, 4, VOCAB)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 5]])
    loss_sum, n = shifted_token_loss(logits, labels)
    ref = (torch.nn.functional.cross_entropy(logits[0, 0:1], torch.tensor([3]), reduction="sum")
           + torch.nn.functional.cross_entropy(logits[0, 2:3], torch.tensor([5]), reduction="sum"))
    assert n == 2 and torch.allclose(loss_sum, ref)
