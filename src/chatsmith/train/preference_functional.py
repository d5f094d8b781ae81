"""Pure tensor functions for preference learning: reward-model and DPO losses, pooling, log-probs.

No models, no I/O: every function takes tensors and returns tensors, states the shapes it expects,
and cites where its numerics come from. `reward_model.py`, `train/reward.py` and `train/dpo.py` build on
these; the PPO, GRPO and evaluation code reuse `last_token_index` / `gather_last_token` and
`sequence_logprobs`. Tree packing places trees with `chatsmith.data.packing.pack_sequences`.

Shapes: `b` batch rows, `t` sequence length, `v` vocabulary, `n` responses (flattened over the batch),
`p` comparison pairs, `g` groups (one per preference example).

References
- Bradley & Terry (1952), "Rank analysis of incomplete block designs": P(a > b) = sigmoid(r_a - r_b).
- Ouyang et al. (2022), "Training language models to follow instructions with human feedback"
  (InstructGPT), eq. 1: K ranked responses give C(K, 2) comparisons that are kept in ONE batch element
  (each response is scored once) and the loss of a prompt is divided by C(K, 2).
- Touvron et al. (2023), "Llama 2", sec. 3.2.2: the optional margin m(r) in -log sigmoid(r_c - r_r - m).
- Rafailov et al. (2023), "Direct Preference Optimization", eq. 7 (loss) and sec. 5 (implicit reward
  beta * log(pi / pi_ref)).
- Mitchell (2023), "A note on DPO with noisy preferences" (conservative DPO, label smoothing).
- Azar et al. (2023), "A General Theoretical Paradigm to Understand Learning from Human Preferences" (IPO).

Run the checks: `python -m pytest tests/test_preference_functional.py -q`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatsmith.data.packing import pack_sequences

__all__ = [
    "bradley_terry_loss", "ranking_pairs", "expand_rankings", "ranking_loss", "pairwise_accuracy",
    "last_token_index", "gather_last_token", "position_ids_from_mask", "token_logprobs",
    "sequence_logprobs", "segment_sum", "segment_mean", "dpo_loss", "dpo_implicit_rewards",
    "PrefixTree", "PackedTrees", "prefix_tree", "pack_trees", "attention_mask_4d",
]


# ----------------------------------------------------------------------------- reward model

def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-pair Bradley-Terry negative log-likelihood `-log sigmoid(r_c - r_r - margin)`.

    chosen_rewards, rejected_rewards: `(p,)`; margin: scalar or `(p,)` (Llama 2's margin term; 0 = plain
    BT, Ouyang et al. 2022 eq. 1). Returns `(p,)`.

    Computed with `F.logsigmoid`, which is `-softplus(-x)` evaluated stably: at x = -200 it returns -200
    (not -inf as `log(sigmoid(x))` would, whose sigmoid underflows to 0) and at x = +200 it returns 0.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin)


def ranking_pairs(num_responses: int) -> list[tuple[int, int]]:
    """All C(K, 2) (better, worse) index pairs of a best-first ranking of K responses (InstructGPT)."""
    return list(itertools.combinations(range(num_responses), 2))


def expand_rankings(num_responses: list[int], device: torch.device | str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors that turn a flat `(n,)` reward vector into all within-example comparisons.

    num_responses[i] = K_i, the number of best-first ranked responses of example i; their rewards sit
    consecutively in the flat vector (example 0's K_0, then example 1's, ...). Returns
    `better (p,)`, `worse (p,)` (indices into the flat vector) and `group (p,)` (which example each pair
    belongs to), with p = sum_i C(K_i, 2). Each response appears once in the flat vector however many
    pairs it is in, as in InstructGPT (Ouyang et al. 2022, sec. C.4 / eq. 1).
    """
    better, worse, group = [], [], []
    offset = 0
    for i, k in enumerate(num_responses):
        if k < 2:
            raise ValueError(f"example {i} has {k} response(s); a comparison needs at least 2")
        for a, b in ranking_pairs(k):
            better.append(offset + a)
            worse.append(offset + b)
            group.append(i)
        offset += k
    as_long = dict(dtype=torch.long, device=device)
    return torch.tensor(better, **as_long), torch.tensor(worse, **as_long), torch.tensor(group, **as_long)


def ranking_loss(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, group: torch.Tensor,
                 num_groups: int, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """InstructGPT ranking loss per example: the mean BT loss over that example's C(K, 2) pairs.

    rewards `(n,)`; better/worse/group `(p,)` from `expand_rankings`; margin scalar or `(p,)`.
    Returns `(g,)` with g = num_groups. Dividing by C(K, 2) per example (Ouyang et al. 2022, eq. 1)
    keeps a 9-way ranking from outweighing a pairwise example 36 to 1; for pairwise data it is the plain
    per-pair loss.
    """
    per_pair = bradley_terry_loss(rewards[better], rewards[worse], margin)
    return segment_mean(per_pair, group, num_groups)


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs `(p,)` where the chosen reward is strictly higher; ties count as half. Scalar."""
    diff = chosen_rewards - rejected_rewards
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()


# ----------------------------------------------------------------------------- pooling / positions

def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, from the attention mask (not from pad ids).

    attention_mask `(b, t)` with 1 on real tokens. Returns `(b,)` long. Works for right padding (the
    last 1), left padding (t - 1) and pad == eos, where HF's pad-id-based pooling would pick a wrong
    token. A row with no real token returns 0.
    """
    t = attention_mask.shape[-1]
    positions = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.zeros_like(positions)).amax(-1)


def gather_last_token(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values `(b, t, ...)` read at each row's last real token -> `(b, ...)`."""
    idx = last_token_index(attention_mask)
    return values[torch.arange(values.shape[0], device=values.device), idx]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions `(b, t)` counting real tokens only (0 at each row's first real token, pads get 0).

    Passing these makes left-padded rows see the same positions as right-padded ones, which matters for
    absolute position embeddings (GPT-2) and keeps RoPE numerics identical across paddings.
    """
    mask = attention_mask.long()
    return ((mask.cumsum(-1) - 1) * mask).clamp(min=0)


# ----------------------------------------------------------------------------- log-probs

def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under logits: logits `(..., v)`, labels `(...)` -> `(...)` float32.

    Already-aligned inputs (the caller shifts: logits at position i predict labels at i + 1). Uses
    `cross_entropy` (a fused log-softmax + gather) in float32 so bf16 logits do not lose precision.
    Labels equal to -100 give 0.
    """
    flat = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).clamp(min=0),
                            reduction="none")
    flat = flat.masked_fill(labels.reshape(-1) < 0, 0.0)
    return flat.view(labels.shape)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over response tokens of each row (DPO's log pi(y | x), Rafailov et al. 2023).

    logits `(b, t, v)` from a causal LM on input_ids `(b, t)`; response_mask `(b, t)` is 1 on the
    tokens whose probability counts (the assistant mask of `render_chat`: reply + end-of-turn token).
    The shift is done here: logits[:, i] scores input_ids[:, i + 1]. Returns `(b,)` float32.
    """
    lp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return (lp * response_mask[:, 1:].to(lp.dtype)).sum(-1)


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum values `(m,)` into `(num_segments,)` by segment_ids `(m,)` (e.g. tokens -> their response)."""
    out = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    return out.index_add(0, segment_ids, values)


def segment_mean(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Mean of values `(m,)` per segment -> `(num_segments,)`; empty segments give 0."""
    sums = segment_sum(values, segment_ids, num_segments)
    counts = segment_sum(torch.ones_like(values), segment_ids, num_segments)
    return sums / counts.clamp(min=1)


# ----------------------------------------------------------------------------- DPO

def dpo_implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, sec. 5). `(n,)`."""
    return beta * (policy_logps - reference_logps)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss per pair and the implicit rewards of both responses.

    All inputs `(p,)`: summed response log-probs under the policy and the frozen reference.
    Returns `(losses (p,), chosen_rewards (p,), rejected_rewards (p,))`; rewards are detached.

    - "sigmoid" (Rafailov et al. 2023, eq. 7): `-logsigmoid(beta * h)` with
      h = (log pi_c - log ref_c) - (log pi_r - log ref_r). With `label_smoothing` = eps (conservative
      DPO, Mitchell 2023) the label is flipped with probability eps:
      `-(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)`.
    - "ipo" (Azar et al. 2023, eq. 17): `(h - 1 / (2 beta))^2`, a squared loss that does not push the
      margin to infinity on deterministic preferences.
    """
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")
    chosen_rewards = dpo_implicit_rewards(policy_chosen_logps, reference_chosen_logps, beta).detach()
    rejected_rewards = dpo_implicit_rewards(policy_rejected_logps, reference_rejected_logps, beta).detach()
    return losses, chosen_rewards, rejected_rewards


def chosen_nll(logps: torch.Tensor, num_tokens: torch.Tensor, num_responses: list[int]) -> torch.Tensor:
    """Per-example negative log-likelihood of its best response, per token: `(g,)`.

    `logps (n,)`: summed response log-probs of all conversations, best-first per example (as in
    `expand_rankings`); `num_tokens (n,)`: their response token counts. The term RPO adds to DPO (Pang et al.
    2024, "Iterative Reasoning Preference Optimization", eq. 1; TRL's `rpo_alpha`): DPO alone can lower the
    chosen response's likelihood along with the rejected one's and move the mass to replies no pair showed.
    """
    counts = torch.tensor(num_responses, dtype=torch.long, device=logps.device)
    first = counts.cumsum(0) - counts          # index of each example's best response
    return -logps[first] / num_tokens[first].clamp(min=1).to(logps.dtype)


# ----------------------------------------------------------------------------- shared-prompt packing

@dataclass
class PrefixTree:
    """One preference example as a tree: the token prefix its K conversations share, then K branches.

    ``full_i = prefix + suffixes[i]`` is the token sequence of conversation i (prompt + response i).
    ``loss_masks[i]`` (optional, length ``len(full_i)``) marks the tokens of full_i whose log-probability
    counts (DPO); it may mark tokens inside the shared prefix (responses that start alike).
    """

    prefix: list[int]
    suffixes: list[list[int]]
    loss_masks: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(s) for s in self.suffixes)


def prefix_tree(sequences: list[list[int]], loss_masks: list[list[int]] | None = None,
                share: bool = True) -> PrefixTree:
    """Split K token sequences into their longest common prefix and K non-empty suffixes.

    Each suffix keeps at least one token, so every conversation's last token (where a reward model
    reads its score) lies in its own branch. ``share=False`` gives an empty prefix (K independent
    sequences), which is the layout of ordinary pairwise training.
    """
    common = 0
    if share and sequences:
        shortest = min(len(s) for s in sequences)
        first = sequences[0]
        while common < shortest - 1 and all(s[common] == first[common] for s in sequences[1:]):
            common += 1
    return PrefixTree(list(sequences[0][:common]) if sequences else [],
                      [list(s[common:]) for s in sequences], loss_masks)


@dataclass
class PackedTrees:
    """Several prefix trees packed into rows with a tree attention mask; all tensors on one device.

    - ``input_ids (r, L)``, ``position_ids (r, L)``: each branch continues the positions of its prefix,
      so a branch sees exactly what conversation i alone would see (same tokens, same positions).
    - ``attention_mask (r, 1, L, L)`` bool, True = may attend: causal within a tree, a branch never sees
      another branch; pad tokens attend to themselves only (no fully masked row: no NaN in SDPA).
    - ``last_token (n,)``: flat index ``row * L + col`` of each conversation's last token (n = all
      conversations of all trees, tree by tree, branch by branch).
    - ``num_responses``: K of each tree (a list, used by ``expand_rankings``).
    - With targets (DPO): ``logit_index (m,)`` flat index of the position whose logits predict
      ``target_ids (m,)``; ``target_response (m,)`` which conversation the target belongs to.
    - ``n_tokens``: real (non-pad) tokens in the batch.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_token: torch.Tensor
    num_responses: list[int]
    n_tokens: int
    logit_index: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    target_response: torch.Tensor | None = None

    @property
    def n_targets(self) -> int:
        """Number of preference examples (trees): the unit the reward-model and DPO losses average over."""
        return len(self.num_responses)


def pack_trees(trees: list[PrefixTree], pad_id: int, capacity: int | None = None,
               with_targets: bool = False) -> PackedTrees:
    """Pack prefix trees into as few rows as fit ``capacity`` tokens (default: the longest tree).

    Packing several short examples into one row and sharing each prompt between its K responses
    removes the padding and the repeated prompt tokens that one-row-per-response batches compute
    (the layout of e.g. TRL's RewardTrainer), with the same result: every response is scored once and
    sees exactly its own prompt. A tree never spans two rows. Deterministic (ties broken by index).
    """
    lengths = [len(t) for t in trees]
    capacity = max(max(lengths), capacity or 0)
    bins = pack_sequences(lengths, capacity)
    width = max(sum(lengths[i] for i in b) for b in bins)
    rows = len(bins)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((rows, width), dtype=torch.long)
    tree_of = torch.full((rows, width), -1, dtype=torch.long)
    branch_of = torch.zeros((rows, width), dtype=torch.long)
    # Conversations are numbered tree by tree in the ORIGINAL tree order, whatever row they land in.
    first_response = [0]
    for t in trees:
        first_response.append(first_response[-1] + len(t.suffixes))
    last_token = [0] * first_response[-1]
    logit_index: list[int] = []
    target_ids: list[int] = []
    target_response: list[int] = []
    for r, members in enumerate(bins):
        col = 0
        for i in sorted(members):
            tree = trees[i]
            p = len(tree.prefix)
            ids[r, col:col + p] = torch.tensor(tree.prefix, dtype=torch.long)
            pos[r, col:col + p] = torch.arange(p)
            tree_of[r, col:col + p] = i
            prefix_cols = list(range(col, col + p))
            col += p
            for k, suffix in enumerate(tree.suffixes):
                s = len(suffix)
                ids[r, col:col + s] = torch.tensor(suffix, dtype=torch.long)
                pos[r, col:col + s] = torch.arange(p, p + s)
                tree_of[r, col:col + s] = i
                branch_of[r, col:col + s] = k + 1
                response = first_response[i] + k
                last_token[response] = r * width + col + s - 1
                if with_targets:
                    full = tree.prefix + suffix
                    cols = prefix_cols + list(range(col, col + s))   # column of each token of `full`
                    mask = tree.loss_masks[k] if tree.loss_masks is not None else [0] * p + [1] * s
                    for j in range(1, len(full)):
                        if mask[j]:
                            logit_index.append(r * width + cols[j - 1])
                            target_ids.append(full[j])
                            target_response.append(response)
                col += s
    attention = attention_mask_4d(tree_of, branch_of)
    long = dict(dtype=torch.long)
    return PackedTrees(
        input_ids=ids, position_ids=pos, attention_mask=attention,
        last_token=torch.tensor(last_token, **long), num_responses=[len(t.suffixes) for t in trees],
        n_tokens=int(sum(lengths)),
        logit_index=torch.tensor(logit_index, **long) if with_targets else None,
        target_ids=torch.tensor(target_ids, **long) if with_targets else None,
        target_response=torch.tensor(target_response, **long) if with_targets else None)


def attention_mask_4d(tree_of: torch.Tensor, branch_of: torch.Tensor) -> torch.Tensor:
    """Tree attention mask `(r, 1, L, L)` bool from per-token tree ids `(r, L)` (-1 = pad) and branch
    ids `(r, L)` (0 = shared prefix, k + 1 = branch k).

    Query q may see key k iff both are in the same tree, k is not after q, and k is in the prefix or in
    q's own branch. Pads see only themselves so no softmax row is empty.
    """
    length = tree_of.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=tree_of.device).tril()
    same_tree = (tree_of[:, :, None] == tree_of[:, None, :]) & (tree_of[:, :, None] >= 0)
    visible_branch = (branch_of[:, None, :] == 0) | (branch_of[:, :, None] == branch_of[:, None, :])
    mask = same_tree & visible_branch & causal
    pad_self = (tree_of < 0)[:, :, None] & torch.eye(length, dtype=torch.bool, device=tree_of.device)
    return (mask | pad_self)[:, None]
