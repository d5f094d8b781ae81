"""Checks of the RL arithmetic (chatsmith.train.rl_functional) and of rollout masking, against numbers
worked out by hand. Run: `python -m pytest tests/test_rl_functional.py -q`."""

from __future__ import annotations

import math

import pytest
import torch

from chatsmith.train import rl_functional as F
from chatsmith.train.rollout import apply_no_eos_penalty, pad_rollout, position_ids_from_mask, truncate_at_stop


# ----------------------------------------------------------------------------- GAE

def test_gae_hand_computed_example():
    # Two episodes; the second is one token shorter (its 3rd column is padding with junk in it).
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 7.0]])
    values = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = F.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 0, right to left: d2 = 1 + 0 - 3 = -2, A2 = -2; d1 = 0 + 3 - 2 = 1, A1 = 1 + .5 * -2 = 0;
    #                       d0 = 0 + 2 - 1 = 1, A0 = 1 + .5 * 0 = 1.
    # Row 1: the padded step is ignored (V = A = 0 past the end): d1 = 2 + 0 - 1 = 1, A1 = 1;
    #        d0 = .5 + 1 - 1 = .5, A0 = .5 + .5 * 1 = 1.
    assert torch.allclose(adv, torch.tensor([[1.0, 0.0, -2.0], [1.0, 1.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[2.0, 2.0, 1.0], [2.0, 2.0, 0.0]]))


def test_gae_with_discount_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    adv, _ = F.gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.5)
    # d2 = 1 - 3 = -2; d1 = .9 * 3 - 2 = .7; d0 = .9 * 2 - 1 = .8; gamma * lam = .45
    # A2 = -2; A1 = .7 + .45 * -2 = -.2; A0 = .8 + .45 * -.2 = .71
    assert torch.allclose(adv, torch.tensor([[0.71, -0.2, -2.0]]), atol=1e-6)


def test_gae_matches_the_definition_as_a_sum_of_td_residuals():
    torch.manual_seed(0)
    b, r, gamma, lam = 4, 7, 1.0, 0.95
    rewards, values = torch.randn(b, r), torch.randn(b, r)
    lengths = torch.tensor([7, 3, 1, 5])
    mask = (torch.arange(r)[None] < lengths[:, None]).float()
    adv, ret = F.gae(rewards, values, mask, gamma, lam)
    for i in range(b):
        n = int(lengths[i])
        v = torch.cat([values[i, :n], torch.zeros(1)])
        deltas = [float(rewards[i, t] + gamma * v[t + 1] - v[t]) for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t))
            assert adv[i, t].item() == pytest.approx(expected, abs=1e-5)
            assert ret[i, t].item() == pytest.approx(expected + float(values[i, t]), abs=1e-5)
        assert torch.all(adv[i, n:] == 0) and torch.all(ret[i, n:] == 0)


# ----------------------------------------------------------------------------- masked statistics

def test_masked_mean_var_whiten_ignore_padding():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert F.masked_mean(values, mask).item() == pytest.approx(2.5)
    assert F.masked_var(values, mask).item() == pytest.approx(5.0 / 3.0)          # unbiased, n = 4
    assert F.masked_var(values, mask, unbiased=False).item() == pytest.approx(1.25)
    w = F.masked_whiten(values, mask)
    assert F.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert F.masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    kept = F.masked_whiten(values, mask, shift_mean=False)
    assert F.masked_mean(kept, mask).item() == pytest.approx(2.5, abs=1e-5)
    assert F.masked_mean(values, torch.zeros_like(mask)).item() == 0.0          # no NaN on empty masks
    assert torch.allclose(F.masked_mean(values, mask, dim=-1), torch.tensor([2.0, 4.0]))


# ----------------------------------------------------------------------------- KL estimators

def test_kl_estimators_at_known_points():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert F.kl_k1(logp, ref).item() == pytest.approx(1.0)
    assert F.kl_k2(logp, ref).item() == pytest.approx(0.5)
    assert F.kl_k3(logp, ref).item() == pytest.approx(math.exp(-1) - 1 + 1)    # (r - 1) - log r, log r = -1
    assert F.kl_k3(ref, logp).item() == pytest.approx(math.e - 1 - 1)
    same = torch.tensor([-0.7])
    for name in ("k1", "k2", "k3"):
        assert F.kl_estimate(same, same, name).item() == 0.0
    with pytest.raises(ValueError):
        F.kl_estimate(same, same, "k4")


def test_kl_estimators_are_unbiased_in_expectation():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    true_kl = float((p * (p / q).log()).sum())
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 400_000, replacement=True, generator=gen)
    logp, logq = p.log()[x], q.log()[x]
    k1, k2, k3 = F.kl_k1(logp, logq), F.kl_k2(logp, logq), F.kl_k3(logp, logq)
    assert k1.mean().item() == pytest.approx(true_kl, rel=0.02)
    assert k3.mean().item() == pytest.approx(true_kl, rel=0.02)
    assert (k3 >= 0).all() and (k2 >= 0).all()
    assert (k1 < 0).any()                      # k1 is unbiased but individual samples go negative
    assert k3.std() < k1.std()                 # ... and k3 has lower variance (Schulman 2020)


# ----------------------------------------------------------------------------- log-probs, entropy

def test_logprobs_and_entropy_from_logits():
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0]]])
    tokens = torch.tensor([[0]])
    expected = 2.0 - math.log(math.exp(2.0) + 3)
    assert F.logprobs_from_logits(logits, tokens).item() == pytest.approx(expected)
    # Temperature 2 divides the logits: logits [1, 0, 0, 0].
    assert F.logprobs_from_logits(logits, tokens, temperature=2.0).item() == pytest.approx(1 - math.log(math.e + 3))
    assert F.entropy_from_logits(torch.zeros(3, 5, 7)).allclose(torch.full((3, 5), math.log(7)))
    probs = torch.softmax(logits, -1)
    assert F.entropy_from_logits(logits).item() == pytest.approx(float(-(probs * probs.log()).sum()))
    # Extreme logits do not produce NaN (no log of an underflowed probability).
    assert torch.isfinite(F.entropy_from_logits(torch.tensor([[1e4, -1e4, 0.0]]))).all()
    # Both from one log-softmax: the same log-probs (with grad) and entropy (without), extreme logits too.
    torch.manual_seed(0)
    many = torch.cat([torch.randn(2, 3, 50) * 4, torch.tensor([1e4, -1e4] + [0.0] * 48).expand(2, 1, 50)], 1)
    many.requires_grad_(True)
    picks = torch.randint(0, 50, (2, 4))
    lp, ent = F.logprobs_and_entropy(many, picks)
    assert torch.equal(lp, F.logprobs_from_logits(many, picks)) and lp.requires_grad and not ent.requires_grad
    torch.testing.assert_close(ent, F.entropy_from_logits(many.detach()))


# ----------------------------------------------------------------------------- rewards

def test_per_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([1.0, -2.0])
    rewards, non_score = F.per_token_rewards(scores, kl, mask, beta=0.1)
    assert torch.allclose(non_score, torch.tensor([[-0.01, -0.02, -0.03], [-0.05, -0.05, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.01, -0.02, 0.97], [-0.05, -2.05, 0.0]]))
    # An empty response (all-zero mask) gets no reward anywhere rather than crashing.
    rewards, _ = F.per_token_rewards(torch.tensor([3.0]), torch.zeros(1, 2), torch.zeros(1, 2), 0.1)
    assert rewards.abs().sum() == 0


def test_no_eos_penalty_replaces_the_score():
    scores = torch.tensor([2.0, 3.0, -0.5])
    finished = torch.tensor([True, False, True])
    assert apply_no_eos_penalty(scores, finished, -1.0).tolist() == [2.0, -1.0, -0.5]
    assert apply_no_eos_penalty(scores, finished, None).tolist() == scores.tolist()


# ----------------------------------------------------------------------------- clipped losses

def test_policy_loss_at_known_values():
    # Four tokens: ratio 1.5 or 0.5, advantage +1 or -1, clip 0.2.
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    old = torch.zeros(1, 4)
    loss, stats = F.policy_loss(ratio.log(), old, adv, torch.ones(1, 4), clip_range=0.2)
    # A=+1,r=1.5: max(-1.5, -1.2) = -1.2 (clipped); A=+1,r=.5: max(-.5, -.8) = -.5;
    # A=-1,r=1.5: max(1.5, 1.2) = 1.5;              A=-1,r=.5: max(.5, .8) = .8 (clipped).
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    assert stats["approx_kl"].item() == pytest.approx(float((0.5 * ratio.log() ** 2).mean()))
    # The clipped tokens carry no gradient; the others have d/dlogp (-A r) = -A r.
    logp = ratio.log().clone().requires_grad_(True)
    F.policy_loss(logp, old, adv, torch.ones(1, 4))[0].backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5, 1.5, 0.0]]) / 4)
    # Masked tokens do not count.
    masked, _ = F.policy_loss(ratio.log(), old, adv, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert masked.item() == pytest.approx(-1.2)


def test_value_loss_at_known_values():
    old = torch.zeros(1, 3)
    returns = torch.ones(1, 3)
    values = torch.tensor([[0.5, 0.1, 2.0]])
    loss, stats = F.value_loss(values, old, returns, torch.ones(1, 3), clip_range_value=0.2)
    # v=.5: clipped to .2 -> max(.25, .64) = .64; v=.1: inside -> .81; v=2: clipped .2 -> max(1, .64) = 1.
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 1.0) / 3)
    assert stats["value_clip_fraction"].item() == pytest.approx(1 / 3)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert F.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert F.explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0)
    assert F.explained_variance(returns, torch.ones(1, 4), mask).item() == 0.0   # Var(returns) = 0


# ----------------------------------------------------------------------------- KL controllers

def test_adaptive_kl_controller_follows_ziegler():
    ctl = F.AdaptiveKLController(value=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=256)            # error clipped at +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    ctl.update(current_kl=5.4, n_steps=1000)            # error -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000) * (1 - 0.1 * 0.1))
    restored = F.AdaptiveKLController(value=1.0, target=6.0, horizon=10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = F.FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05


# ----------------------------------------------------------------------------- GRPO

def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0, 0.0, 1.0, 2.0, 5.0])
    adv = F.group_advantages(rewards, group_size=2)
    s = math.sqrt(0.5)                                   # unbiased std of {0, 1}
    assert adv[:2].tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4)])
    assert adv[2:4].tolist() == [0.0, 0.0]               # all equal: no signal, no NaN
    four = F.group_advantages(rewards, group_size=4)
    g0 = rewards[:4]
    assert four[:4].tolist() == pytest.approx(((g0 - g0.mean()) / (g0.std() + 1e-4)).tolist())
    assert F.group_advantages(rewards, 4, scale=False)[:4].tolist() == pytest.approx((g0 - g0.mean()).tolist())
    with pytest.raises(ValueError):
        F.group_advantages(rewards, group_size=3)


def test_grpo_loss_values_and_aggregation():
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, stats = F.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    assert loss.item() == pytest.approx(0.0)              # (-1 + 1) / 2 with ratio 1
    loss.backward()
    # "grpo": each response weighs 1/2, its tokens 1/|o|: d/dlogp = -A / (2 |o|).
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.0, 0.0]]))
    logp.grad = None
    F.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, loss_type="token")[0].backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25, -0.25], [0.25, 0.0, 0.0]]))
    # KL term: beta * k3 against the reference is added per token.
    ref = torch.full((2, 3), -1.0)
    loss, stats = F.grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), ref, torch.zeros(2), mask, beta=0.5)
    k3 = math.exp(-1) + 1 - 1
    assert loss.item() == pytest.approx(0.5 * k3)
    assert stats["kl"].item() == pytest.approx(k3)


# ----------------------------------------------------------------------------- rollout masks

def test_truncate_at_stop_masks_everything_after_end_of_turn():
    assert truncate_at_stop([5, 6, 2, 7, 2, 8], stop_token_ids=[2]) == ([5, 6, 2], True)
    assert truncate_at_stop([5, 6, 7], stop_token_ids=[2]) == ([5, 6, 7], False)
    assert truncate_at_stop([9, 5], stop_token_ids=[2, 9]) == ([9], True)


def test_pad_rollout_layout():
    prompts = [[10, 11, 12], [20]]
    responses = [[1, 2], [3, 4, 5, 6]]
    ids, attn, p, resp, resp_mask = pad_rollout(prompts, responses, pad_id=0)
    assert p == 3
    assert ids.tolist() == [[10, 11, 12, 1, 2, 0, 0], [0, 0, 20, 3, 4, 5, 6]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    assert resp_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert position_ids_from_mask(attn).tolist() == [[0, 1, 2, 3, 4, 0, 0], [0, 0, 0, 1, 2, 3, 4]]
