"""Pure tensor functions for RL fine-tuning of language models: PPO (RLHF) and GRPO.

No models, no I/O: every function takes tensors and returns tensors, states the shapes it expects and
cites where its numerics come from. `train/ppo.py`, `train/grpo.py` and `train/rollout.py` are built
on these; read this file top to bottom to see the whole of PPO-for-RLHF's arithmetic.

Shapes: `b` episodes (prompt + sampled response), `r` response length (the longest response of the
batch; shorter ones are right-padded and masked), `v` vocabulary, `g` groups (GRPO: prompts), `G`
samples per group. A `mask` is `(b, r)`, 1.0 on response tokens up to and including the end-of-turn
token, 0.0 after it.

References
- [Schulman 2016] Schulman, Moritz, Levine, Jordan, Abbeel (2016), "High-Dimensional Continuous
  Control Using Generalized Advantage Estimation", eq. 16 (GAE) and the TD residual of eq. 10.
- [Schulman 2017] Schulman, Wolski, Dhariwal, Radford, Klimov (2017), "Proximal Policy Optimization
  Algorithms", eq. 7 (clipped surrogate objective).
- [Schulman 2020] Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
  (estimators k1, k2, k3).
- [Ziegler 2019] Ziegler, Stiennon, Wu, Brown, Radford, Amodei, Christiano, Irving (2019), "Fine-Tuning
  Language Models from Human Preferences", sec. 2.2: reward R(x, y) = r(x, y) - beta * KL and the
  adaptive KL controller (target KL, horizon; proportional error clipped to [-0.2, 0.2]).
- [Stiennon 2020] Stiennon et al. (2020), "Learning to summarize from human feedback", eq. 1: the KL
  term is a per-token penalty and the reward-model score is given at the end of the response.
- [Huang 2024] Huang, Noukhovitch, Hosseini, Rasul, Wang, Tunstall (2024), "The N+ Implementation
  Details of RLHF with PPO: A Case Study on TL;DR Summarization": masked whitening with the mean shifted
  back (detail 6), reward at the end-of-turn token, clipped value loss with 0.5 factor, clip fraction and
  approx-KL diagnostics, entropy from logits, explained variance.
- [Shao 2024] Shao et al. (2024), "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models", sec. 4.1 eq. 3-4 (GRPO objective, k3 KL to the reference) and "outcome
  supervision" (group-normalised advantage given to every token of the response).
- [Liu 2025] Liu et al. (2025), "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO)
  and Yu et al. (2025), "DAPO": token-level normalisation as an alternative to the per-sequence mean.

Run the checks: `python -m pytest tests/test_rl_functional.py -q`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "masked_sum", "masked_mean", "masked_var", "masked_whiten", "logprobs_from_logits",
    "logprobs_and_entropy", "entropy_from_logits", "kl_k1", "kl_k2", "kl_k3", "kl_estimate", "per_token_rewards", "gae",
    "policy_loss", "value_loss", "explained_variance", "AdaptiveKLController", "FixedKLController",
    "group_advantages", "grpo_loss",
]

# Sums a tensor over the processes that each hold a share of the batch (`parallel.sum_over_ranks`).
SumAcross = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- masked statistics

def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1. values, mask: same shape, e.g. `(b, r)`."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                sum_across: SumAcross | None = None) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is 1 (over all, or along `dim`).

    values, mask `(b, r)`. An all-zero mask gives 0, not NaN (the count is clamped to 1) - a batch whose
    every response is empty must not poison the optimizer. `sum_across` (with `dim=None`): the mean over
    the whole batch when it is split over processes (see `masked_var`).
    """
    if sum_across is None:
        return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)
    if dim is not None:
        raise ValueError("masked_mean: sum_across needs dim=None (a mean over the whole batch)")
    total, count = sum_across(torch.stack([masked_sum(values, mask), mask.sum().to(values.dtype)]))
    return total / count.clamp(min=1)


def _summed(t: torch.Tensor, sum_across: SumAcross | None) -> torch.Tensor:
    return t if sum_across is None else sum_across(t)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
               sum_across: SumAcross | None = None) -> torch.Tensor:
    """Variance of the masked entries of `values` `(b, r)`; scalar.

    With `unbiased` the sum of squares is divided by n - 1 (Bessel's correction), as in the reference
    implementation of Ziegler et al. / Huang 2024 (`masked_var(..., unbiased=True)`).
    `sum_across`: when the batch is split over processes, a function that sums a tensor over them
    (`parallel.sum_over_ranks`); the variance is then that of the whole batch, not of this process's share.
    """
    mean = masked_mean(values, mask, sum_across=sum_across)
    n = _summed(mask.sum().to(values.dtype), sum_across)
    centred_sq = _summed(masked_sum((values - mean) ** 2, mask), sum_across) / n.clamp(min=1)
    if unbiased:
        if n <= 1:
            return centred_sq
        centred_sq = centred_sq * n / (n - 1)
    return centred_sq


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8, sum_across: SumAcross | None = None) -> torch.Tensor:
    """Normalise masked entries of `values` `(b, r)` to variance 1 (and mean 0 if `shift_mean`).

    Statistics come from the masked (real-response) tokens only, so padding does not dilute them.
    [Huang 2024] detail 6: advantages are whitened with the mean shifted away (`shift_mean=True`);
    rewards, when whitened, keep their mean (`shift_mean=False`) so a uniformly good batch stays good.
    Masked-out positions keep whatever value the arithmetic gives; callers mask them again. `sum_across`:
    statistics of the whole batch when it is split over processes (see `masked_var`).
    """
    mean, var = masked_mean(values, mask, sum_across=sum_across), masked_var(values, mask, sum_across=sum_across)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# ----------------------------------------------------------------------------- log-probs, entropy

def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) under `logits / temperature`, in float32.

    logits `(b, r, v)` already aligned with tokens `(b, r)` (logits at position i score tokens[i]).
    Dividing by the sampling temperature makes these the log-probs of the distribution the responses
    were actually drawn from; forgetting it makes the PPO ratio wrong from the first step
    ([Huang 2024], "the temperature must be applied to the logits when computing log-probs").
    Returns `(b, r)`.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax then gather: the same value as -cross_entropy, without building a flat copy.
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_from_logits` (with grad) and, from the same log-softmax, the entropy `-sum_v p_v log p_v`
    (no grad: it is only logged). logits `(b, r, v)` aligned with tokens `(b, r)`; returns two `(b, r)`
    float32 tensors. One log-softmax serves both, instead of a softmax and a logsumexp more.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    logprobs = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logprobs, entropy


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H = -sum_v p_v log p_v of the softmax of logits `(..., v)` -> `(...)`, float32.

    Computed as `logsumexp(z) - sum_v softmax(z)_v z_v`, which needs no log of a probability that may
    underflow to 0 ([Huang 2024], TRL's `entropy_from_logits`).
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# ----------------------------------------------------------------------------- KL estimators

def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(x) - log pi_ref(x) for x ~ pi: unbiased for KL(pi || pi_ref), high variance, can be < 0.

    [Schulman 2020]. Shapes `(b, r)` -> `(b, r)`. Summed over a response it is exactly the sequence
    log-ratio, which is what [Ziegler 2019] and [Stiennon 2020] penalise; PPO's default.
    """
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (log pi(x) - log pi_ref(x))^2: biased, low variance, always >= 0. [Schulman 2020].

    Also PPO's "approx-KL" diagnostic between old and new policy ([Huang 2024]). `(b, r)` -> `(b, r)`.
    """
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(x) / pi(x): unbiased, low variance, always >= 0.

    [Schulman 2020]; GRPO's KL term ([Shao 2024] eq. 4). `(b, r)` -> `(b, r)`. The log-ratio is
    clamped to [-20, 20] before `exp` so one wildly off token cannot overflow to inf.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return torch.expm1(log_ratio) - log_ratio


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate by name: "k1", "k2" or "k3" ([Schulman 2020]). `(b, r)`."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k2":
        return kl_k2(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


# ----------------------------------------------------------------------------- rewards and advantages

def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float | torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF: `-beta * KL_t` on every response token, plus the score on the last one.

    scores `(b,)` (reward-model score or no-end-of-turn penalty of each response); kl `(b, r)` per-token
    KL estimate; mask `(b, r)`. Returns `(rewards (b, r), non_score_rewards (b, r))`, both zero where
    mask is 0. The score sits on each row's last real token - the end-of-turn token, or the last
    token of a truncated response - as in [Ziegler 2019] sec. 2.2 and [Stiennon 2020] eq. 1
    (R = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)), the log-ratio spread over the tokens).
    """
    non_score = -beta * kl * mask
    rewards = non_score.clone()
    lengths = mask.sum(-1).long()
    has_tokens = lengths > 0
    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows[has_tokens], last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens, computed right to left.

    rewards, values, mask `(b, r)`. With delta_t = r_t + gamma * V_{t+1} - V_t (TD residual,
    [Schulman 2016] eq. 10) and A_t = delta_t + gamma * lam * A_{t+1} ([Schulman 2016] eq. 16), where
    V and A beyond the last real token are 0 (the episode ends at end-of-turn). Returns
    `(advantages (b, r), returns (b, r))` with returns = advantages + values (the value target),
    both 0 on masked positions. gamma = 1, lam = 0.95 are the RLHF defaults ([Ziegler 2019],
    [Huang 2024]).

    Masking `values` and chaining through `mask` (not just "next index") makes the recursion correct
    for right-padded rows of different lengths.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    r = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(r)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantage = advantage * mask[:, t]
        advantages[:, t] = advantage
        # A padded position passes zeros on, so the last real token sees V_{T+1} = A_{T+1} = 0.
        next_value = values[:, t]
        next_advantage = advantage
    returns = (advantages + values) * mask
    return advantages, returns


# ----------------------------------------------------------------------------- PPO losses

def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate loss, masked mean over response tokens ([Schulman 2017] eq. 7).

    logprobs (with grad), old_logprobs (rollout-time), advantages, mask: `(b, r)`.
    loss = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)), rho_t = exp(logp - old_logp)
    (the max of negatives = the min of the objective). Returns `(loss, stats)` with stats
    `clip_fraction` (share of tokens where the clipped term is the active one) and `approx_kl`
    (k2 between old and new policy) as logged by [Huang 2024].
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean_t max((V - R)^2, (clip(V, V_old +- eps) - R)^2).

    values (with grad), old_values (rollout-time), returns: `(b, r)`. The clipping keeps the value
    model within eps of its rollout-time prediction, as PPO2's baseline implementation and the RLHF
    reference code do ([Huang 2024]; `cliprange_value = 0.2`). Returns `(loss, stats)` with
    `value_clip_fraction`.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"value_clip_fraction": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       sum_across: SumAcross | None = None) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over masked tokens `(b, r)`; scalar.

    1 = the value model predicts returns perfectly, 0 = no better than a constant, < 0 = worse.
    A standard PPO diagnostic ([Huang 2024]); NaN-free: returns 0 when Var(returns) is 0.
    """
    var_returns = masked_var(returns, mask, unbiased=False, sum_across=sum_across)
    var_residual = masked_var(returns - values, mask, unbiased=False, sum_across=sum_across)
    if var_returns <= 0:
        return torch.zeros((), dtype=values.dtype, device=values.device)
    return 1.0 - var_residual / var_returns


# ----------------------------------------------------------------------------- KL coefficient

@dataclass
class FixedKLController:
    """beta held constant ([Stiennon 2020] uses a fixed beta = 0.05)."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:  # noqa: ARG002 - same API as adaptive
        return None

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Adaptive beta of [Ziegler 2019] sec. 2.2: steer the measured KL towards a target.

        e_t  = clip(KL_t / target - 1, -0.2, 0.2)
        beta <- beta * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    where KL_t is the mean per-episode (sequence-summed) KL of the batch just collected and n_steps the
    number of episodes in it. The clip bounds each multiplicative step to +-0.2 * n / horizon, so beta
    moves smoothly over about `horizon` episodes (Ziegler et al. used target 6 nats, horizon 10,000).
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# ----------------------------------------------------------------------------- GRPO

def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome-supervised advantage: each reward minus its group mean, over the group std.

    rewards `(g * G,)`, ordered group by group (G = group_size consecutive samples of one prompt).
    Returns `(g * G,)`: A_i = (r_i - mean(group)) / (std(group) + eps) ([Shao 2024] sec. 4.1.2). The
    std is the unbiased sample std (Bessel), as in TRL's `GRPOTrainer`; eps = 1e-4 as there, so a group
    whose rewards are all equal gets advantage 0 (it carries no learning signal), not 0/0.
    `scale=False` drops the division (Dr. GRPO, [Liu 2025]: the std favours too-easy/too-hard prompts).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_range: float = 0.2, beta: float = 0.04,
              loss_type: str = "grpo") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective ([Shao 2024] eq. 3), returned as a loss to minimise.

    logprobs (with grad), old_logprobs, ref_logprobs (or None when beta = 0): `(b, r)`; advantages `(b,)`
    (one per response, given to all its tokens); mask `(b, r)`.
    Per token: L_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta * k3_t, where k3 is the KL
    estimator of [Schulman 2020] against the frozen reference (eq. 4; beta = 0.04 in [Shao 2024]).
    Aggregation over tokens (`loss_type`):
    - "grpo": mean over each response's tokens, then mean over responses (1/G sum_i 1/|o_i| sum_t, eq. 3);
    - "token": sum over all tokens / number of tokens (DAPO / Dr. GRPO-style, [Liu 2025]): long
      responses are not down-weighted per token.
    Returns `(loss, stats)` with `clip_fraction`, `kl` (mean per-token k3) and `approx_kl`.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    kl = None
    if ref_logprobs is not None and beta != 0.0:
        kl = kl_k3(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=-1).mean()
    elif loss_type == "token":
        loss = masked_mean(per_token, mask)
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected 'grpo' or 'token'")
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),
            "kl": masked_mean(kl, mask) if kl is not None else torch.zeros((), device=logprobs.device),
        }
    return loss, stats
