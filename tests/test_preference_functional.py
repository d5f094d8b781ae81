"""Pure preference-learning functions: Bradley-Terry, ranking expansion, pooling, log-probs, DPO, packing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chatsmith.train.preference_functional import (bradley_terry_loss, chosen_nll, dpo_implicit_rewards, dpo_loss,
                                                   expand_rankings, gather_last_token, last_token_index,
                                                   pack_trees, pairwise_accuracy, position_ids_from_mask,
                                                   prefix_tree, ranking_loss, ranking_pairs, segment_sum,
                                                   sequence_logprobs)


def _tiny_llama(cls_name="LlamaForCausalLM", vocab=64, pad=0, seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=pad, num_labels=1,
                                   max_position_embeddings=128)
    return getattr(transformers, cls_name)(cfg).eval()


def test_bradley_terry_values():
    chosen = torch.tensor([1.0, 0.0, -2.0, 3.0])
    rejected = torch.tensor([0.0, 0.0, 1.0, 3.5])
    expected = torch.tensor([math.log1p(math.exp(-d)) for d in (1.0, 0.0, -3.0, -0.5)])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), expected)
    # a margin m shifts the difference: -log sigmoid(d - m)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin=1.0),
                               torch.tensor([math.log1p(math.exp(-(d - 1))) for d in (1.0, 0.0, -3.0, -0.5)]))
    per_pair_margin = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert bradley_terry_loss(chosen, rejected, per_pair_margin)[1] == pytest.approx(math.log1p(math.e))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bradley_terry_stable_at_200(dtype):
    chosen = torch.tensor([200.0, -200.0, 0.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 0.0], dtype=dtype)
    loss = bradley_terry_loss(chosen, rejected)
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(0.0, abs=1e-30)          # log(1 + e^-200)
    assert loss[1].item() == pytest.approx(200.0, rel=1e-2)         # log(1 + e^200) = 200 + tiny
    loss.sum().backward()
    grad = chosen.grad.float()
    assert torch.isfinite(grad).all()
    assert grad.tolist() == pytest.approx([0.0, -1.0, -0.5], abs=1e-2)
    # margins of +-200 via the margin argument, too
    m = bradley_terry_loss(torch.zeros(2), torch.zeros(2), margin=torch.tensor([200.0, -200.0]))
    assert m.tolist() == pytest.approx([200.0, 0.0], abs=1e-3)
    # the naive form really does break there, which is why it is not used
    assert torch.isinf(-torch.log(torch.sigmoid(torch.tensor(-200.0))))


def test_ranking_expansion_all_pairs_within_example():
    assert ranking_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert len(ranking_pairs(5)) == 10
    better, worse, group = expand_rankings([3, 2, 4])
    # example 0: responses 0..2, example 1: 3..4, example 2: 5..8
    assert list(zip(better.tolist(), worse.tolist()))[:4] == [(0, 1), (0, 2), (1, 2), (3, 4)]
    assert group.tolist() == [0, 0, 0, 1] + [2] * 6
    with pytest.raises(ValueError):
        expand_rankings([1])


def test_ranking_loss_is_mean_over_each_examples_pairs():
    rewards = torch.tensor([3.0, 1.0, 0.0, -1.0, 2.0], requires_grad=True)   # K=3 then K=2 (misordered)
    better, worse, group = expand_rankings([3, 2])
    per_example = ranking_loss(rewards, better, worse, group, 2)
    bt = lambda a, b: math.log1p(math.exp(-(a - b)))  # noqa: E731
    ex0 = (bt(3, 1) + bt(3, 0) + bt(1, 0)) / 3
    ex1 = bt(-1, 2)
    assert per_example.tolist() == pytest.approx([ex0, ex1], rel=1e-5)
    assert pairwise_accuracy(rewards[better], rewards[worse]).item() == pytest.approx(3 / 4)
    assert pairwise_accuracy(torch.tensor([1.0]), torch.tensor([1.0])).item() == 0.5


def test_last_token_index_left_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    values = torch.arange(15.0).view(3, 5)
    assert gather_last_token(values, right).tolist() == [2.0, 9.0, 10.0]
    assert position_ids_from_mask(left).tolist()[0] == [0, 0, 0, 1, 2]
    assert position_ids_from_mask(right).tolist()[0] == [0, 1, 2, 0, 0]


def test_sequence_logprobs_sum_over_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
    logp = F.log_softmax(logits, -1)
    expected = torch.stack([logp[0, 1, 3] + logp[0, 2, 4], logp[1, 0, 6]])
    torch.testing.assert_close(sequence_logprobs(logits, ids, mask), expected)
    assert segment_sum(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 0]), 3).tolist() == [3.0, 3.0, 0.0]


def test_dpo_loss_values():
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0])
    rc, rr = torch.tensor([-11.0, -6.0]), torch.tensor([-11.0, -4.0])
    beta = 0.5
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=beta)
    h = torch.tensor([(-10 + 11) - (-12 + 11), (-5 + 6) - (-5 + 4)])   # [2, 2]
    torch.testing.assert_close(losses, -F.logsigmoid(beta * h))
    torch.testing.assert_close(chosen_r, dpo_implicit_rewards(pc, rc, beta))
    torch.testing.assert_close(chosen_r - rejected_r, beta * h)
    # policy == reference: loss is log 2 and rewards are 0
    same, zc, zr = dpo_loss(rc, rr, rc, rr, beta=0.1)
    assert same.tolist() == pytest.approx([math.log(2)] * 2)
    assert zc.abs().max() == 0 and zr.abs().max() == 0
    # conservative DPO mixes in the flipped label
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.25)
    torch.testing.assert_close(smooth, -0.75 * F.logsigmoid(beta * h) - 0.25 * F.logsigmoid(-beta * h))
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    torch.testing.assert_close(ipo, (h - 1.0) ** 2)
    far, _, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-4000.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert torch.isfinite(far).all()
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, loss_type="nope")



def test_chosen_nll_is_the_best_responses_per_token_nll():
    """RPO's term: per example, minus the best (first) response's summed log-prob over its token count."""
    logps = torch.tensor([-6.0, -1.0, -9.0, -4.0, -2.0])      # example 0: 3 ranked responses; example 1: 2
    tokens = torch.tensor([3, 1, 9, 2, 2])
    torch.testing.assert_close(chosen_nll(logps, tokens, [3, 2]), torch.tensor([2.0, 2.0]))

def test_prefix_tree_keeps_a_token_per_branch():
    tree = prefix_tree([[1, 2, 3, 4], [1, 2, 5], [1, 2]])
    assert tree.prefix == [1] and tree.suffixes == [[2, 3, 4], [2, 5], [2]]
    same = prefix_tree([[1, 2], [1, 2]])
    assert same.prefix == [1] and same.suffixes == [[2], [2]]
    flat = prefix_tree([[1, 2], [1, 3]], share=False)
    assert flat.prefix == [] and flat.suffixes == [[1, 2], [1, 3]]


def test_pack_trees_rows_are_the_best_fit_bins():
    """Trees go into rows by the library's one best-fit-decreasing packer, each row holding its trees
    in their original order; a tree never spans two rows."""
    from chatsmith.data.packing import pack_sequences

    trees = [prefix_tree([[10 * k + 1] * n, [10 * k + 1] * (n - 1) + [10 * k + 2]])    # distinct tokens per tree
             for k, n in enumerate((6, 3, 5, 2, 4, 2))]
    lengths = [len(t) for t in trees]
    batch = pack_trees(trees, pad_id=0, capacity=10)
    bins = pack_sequences(lengths, 10)
    assert batch.input_ids.shape == (len(bins), max(sum(lengths[i] for i in b) for b in bins))
    for row, members in enumerate(bins):
        expected = [tok for i in sorted(members) for tok in trees[i].prefix + sum(trees[i].suffixes, [])]
        assert batch.input_ids[row, :len(expected)].tolist() == expected


def test_packed_trees_equal_separate_forwards():
    """Shared-prompt packing scores (and log-probs) every conversation exactly as if it were alone."""
    lm = _tiny_llama("LlamaForCausalLM")
    convs = [[[5, 6, 7, 8, 9], [5, 6, 7, 10, 11, 12], [5, 6, 13]], [[20, 21, 22], [20, 23]], [[30, 31], [32, 33, 34]]]
    masks = [[[0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 1]], [[0, 1, 1], [0, 1]], [[0, 1], [0, 1, 1]]]
    trees = [prefix_tree(c, m) for c, m in zip(convs, masks)]
    batch = pack_trees(trees, pad_id=0, with_targets=True)
    assert batch.input_ids.shape[0] < sum(len(c) for c in convs)        # several trees share a row
    assert batch.num_responses == [3, 2, 2]
    with torch.no_grad():
        hidden = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = lm.lm_head(flat[batch.logit_index])
        logp = -F.cross_entropy(logits, batch.target_ids, reduction="none")
        packed = segment_sum(logp, batch.target_response, 7)
        packed_last = flat[batch.last_token]
        separate, separate_last = [], []
        for conv, mask in zip(convs, masks):
            for seq, m in zip(conv, mask):
                ids = torch.tensor([seq])
                out = lm.model(input_ids=ids).last_hidden_state
                separate.append(sequence_logprobs(lm.lm_head(out), ids, torch.tensor([m]))[0])
                separate_last.append(out[0, -1])
    torch.testing.assert_close(packed, torch.stack(separate), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_last, torch.stack(separate_last), atol=1e-5, rtol=1e-5)
