"""Reward model: Bradley-Terry training on pairwise or ranked preferences, and scoring.

    chatsmith reward --model runs/sft --data preferences.jsonl --out runs/rm
    chatsmith score runs/rm --data responses.jsonl --out scores.jsonl

Training (`train_reward_model`): the reward model is the SFT model's transformer with a scalar head
(`AutoModelForSequenceClassification`, num_labels=1) read at the LAST REAL TOKEN of each conversation,
i.e. the end-of-turn token closing the response. The index comes from the attention mask (correct under
left or right padding and when pad == eos; HF's own pooling looks for the last non-pad id instead).
Loss `-logsigmoid(r_chosen - r_rejected - margin)` (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1); a
K-way ranking is one batch element whose K responses are each scored once and give all C(K, 2) pairs.
All responses of an example sit in the same forward batch; their shared prompt is computed once
(prefix-tree packing, `preference_functional.pack_trees`). One epoch by default, through the shared
`train/supervised.py` Trainer (checkpoints, `--resume`, metrics). A deterministic held-out split gives
pairwise accuracy and mean margin. Afterwards rewards are normalised to mean 0 / std 1 on responses
sampled from the SFT model (falling back to the preference responses; `reward_norm_source` in
metrics.jsonl says which), and the (mean, std) is stored in config.json as `chatsmith_reward_mean` /
`chatsmith_reward_std` and in `reward_normalization.json`. The output is a standard HF directory that
plain `transformers.AutoModelForSequenceClassification` loads.

Public API for PPO / GRPO / rlhf / eval (stable; extend only with defaulted keyword arguments):

    rm = load_reward_model("runs/rm", device="cpu")                # -> RewardModel (eval mode, no grad)
    scores = score_conversations(rm, rm.tokenizer, rm.fmt, conversations, batch_size=16)
        # conversations: list of message lists ending with the assistant reply to score
        # -> (n,) float32 CPU tensor, normalised (mean 0 / std 1 on SFT samples); normalize=False: raw
    scores = rm.score_token_ids(sequences)   # sequences already in the RM's vocabulary: list[list[int]],
        # each ending at the response's end-of-turn token -> (n,) float32 CPU, normalised
    values = token_scores(rm.model, input_ids, attention_mask)     # (b, t): the head at every position
        # (raw, unnormalised; for a value model initialised from the reward model)
    rewards = sequence_rewards(model, input_ids, attention_mask)   # (b,) raw, last real token, with grad

Run the tests: `python -m pytest tests/test_reward.py -q`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from chatsmith.config import arg
from chatsmith.errors import ChatsmithError, DataError
from chatsmith.train.config import TrainConfig
from chatsmith.train.preference_functional import (PackedTrees, PrefixTree, expand_rankings,
                                                   gather_last_token, pack_trees, pairwise_accuracy,
                                                   position_ids_from_mask, prefix_tree, ranking_loss)

__all__ = [
    "RewardConfig", "train_reward_model", "ScoreConfig", "score", "RewardModel", "load_reward_model",
    "score_conversations", "token_scores", "sequence_rewards", "reward_model_from_causal_lm",
    "render_for_scoring", "tokenize_preferences", "split_train_eval", "backbone_hidden", "packed_rewards",
    "NORM_MEAN_KEY", "NORM_STD_KEY", "TreeCollate", "make_reward_loss", "evaluate_preferences", "steps_for_epochs",
    "accuracy_by_group",
]

NORM_MEAN_KEY = "chatsmith_reward_mean"
NORM_STD_KEY = "chatsmith_reward_std"
FORMAT_KEY = "chatsmith_chat_format"
NORM_FILE = "reward_normalization.json"


# ----------------------------------------------------------------------------- model plumbing

def _backbone(model: nn.Module) -> nn.Module:
    """The bare transformer (LlamaModel, Qwen2Model, GPT2Model...) under a task head."""
    prefix = getattr(model, "base_model_prefix", "model")
    inner = getattr(model, prefix, None)
    if inner is None:
        raise ChatsmithError(f"{type(model).__name__} has no '{prefix}' backbone attribute")
    return inner


def _score_head(model: nn.Module) -> nn.Module:
    head = getattr(model, "score", None)
    if head is None:
        raise ChatsmithError(f"{type(model).__name__} has no `score` head; chatsmith reward models are "
                             "*ForSequenceClassification models of decoder architectures (Llama, Qwen2, GPT-2, ...)")
    return head


def _mask_for_model(model: nn.Module, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D bool mask as the model's attention implementation wants it (eager adds masks to scores)."""
    if mask.ndim != 4:
        return mask
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl == "sdpa" or impl == "flex_attention":
        return mask
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ChatsmithError(f"attention implementation {impl!r} cannot take chatsmith's packed tree mask; "
                         "load the model with attn_implementation='sdpa' or 'eager'")


def backbone_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states `(b, t, h)` of the model's transformer (after its final norm).

    attention_mask: `(b, t)` 0/1 padding mask, or a `(b, 1, t, t)` bool mask (packed trees). With a 2D
    mask, positions are counted over real tokens only, so left and right padding give the same result.
    """
    if position_ids is None and attention_mask.ndim == 2:
        position_ids = position_ids_from_mask(attention_mask)
    dtype = next(model.parameters()).dtype
    out = _backbone(model)(input_ids=input_ids, attention_mask=_mask_for_model(model, attention_mask, dtype),
                           position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def sequence_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Raw reward `(b,)` float32 of each row, read at its last real token (from `attention_mask (b, t)`).

    The head runs on the `(b, h)` pooled states only. Differentiable (used for training and PPO values).
    """
    hidden = backbone_hidden(model, input_ids, attention_mask)
    return _score_head(model)(gather_last_token(hidden, attention_mask)).squeeze(-1).float()


def token_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position `(b, t)` float32 (raw). Row i's reward is at its last real token."""
    hidden = backbone_hidden(model, input_ids, attention_mask)
    return _score_head(model)(hidden).squeeze(-1).float()


def packed_rewards(model: nn.Module, batch: PackedTrees) -> torch.Tensor:
    """Raw rewards `(n,)` float32 of every conversation in a packed tree batch (one forward)."""
    hidden = backbone_hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids)
    pooled = hidden.reshape(-1, hidden.shape[-1])[batch.last_token]
    return _score_head(model)(pooled).squeeze(-1).float()


def _disable_dropout(config: Any) -> None:
    """Dropout off (a reward must be a deterministic function of the text; Huang et al. 2024, detail 5)."""
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, 0.0)


def reward_model_from_causal_lm(causal_lm: nn.Module, tokenizer: Any, seed: int = 0) -> nn.Module:
    """An `AutoModelForSequenceClassification` (num_labels=1) sharing the causal LM's transformer weights.

    The new scalar head is drawn from N(0, 1 / sqrt(h + 1)) (the reward-head init of Stiennon et al.
    2020's code, listed by Huang et al. 2024), seeded, so the initial rewards are small.
    """
    from transformers import AutoModelForSequenceClassification

    config = type(causal_lm.config).from_dict(causal_lm.config.to_dict())
    config.num_labels = 1
    config.problem_type = "regression"
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    config.use_cache = False
    _disable_dropout(config)
    rm = AutoModelForSequenceClassification.from_config(config)
    missing, unexpected = _backbone(rm).load_state_dict(_backbone(causal_lm).state_dict(), strict=False)
    if missing or unexpected:
        raise ChatsmithError(f"cannot initialise the reward model from {type(causal_lm).__name__}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    head = _score_head(rm)
    hidden = head.weight.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / math.sqrt(hidden + 1))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    rm.to(next(causal_lm.parameters()).dtype)
    return rm


# ----------------------------------------------------------------------------- tokenisation

def render_for_scoring(messages: list[dict], tokenizer: Any, fmt: Any, max_len: int | None = None,
                       where: str = "conversation") -> tuple[list[int], list[int], bool]:
    """Token ids of a conversation ending at the end-of-turn token of its final assistant reply.

    Returns `(ids, response_mask, truncated)`: `response_mask` is 1 on the final reply's tokens and its
    end-of-turn token (the last contiguous run of `render_chat`'s assistant mask) and 0 elsewhere;
    anything the template renders after the end-of-turn (e.g. chatml's newline) is dropped so the last
    token IS the end-of-turn. Sequences longer than `max_len` lose tokens from the LEFT (the prompt's
    start) so the response and its end-of-turn are kept.
    """
    from chatsmith.chat.render import render_chat

    if not messages or messages[-1].get("role") != "assistant":
        raise DataError(f"{where}: the last message must be the assistant reply to score "
                        f"(got role {messages[-1].get('role') if messages else None!r})")
    rendered = render_chat(messages, tokenizer, fmt)
    ids, mask = list(rendered.input_ids), list(rendered.assistant_mask)
    ones = [i for i, m in enumerate(mask) if m]
    if not ones:
        raise DataError(f"{where}: the chat format produced no assistant tokens for the reply")
    last = ones[-1]
    start = last
    while start > 0 and mask[start - 1]:
        start -= 1
    ids = ids[:last + 1]
    response_mask = [0] * start + [1] * (last + 1 - start)
    truncated = False
    if max_len and len(ids) > max_len:
        cut = len(ids) - max_len
        ids, response_mask, truncated = ids[cut:], response_mask[cut:], True
    return ids, response_mask, truncated


@dataclass
class TokenizedPreferences:
    trees: list[PrefixTree]
    origins: list[str]
    n_truncated: int          # conversations cut to max_len
    n_pairs: int


def tokenize_preferences(examples: Sequence[Any], tokenizer: Any, fmt: Any, max_len: int,
                         share_prompt: bool = True, with_masks: bool = False) -> TokenizedPreferences:
    """Render every response of every `PreferenceExample` and build its prefix tree (prompt shared once).

    `with_masks` keeps each conversation's response mask (DPO needs which tokens to sum log-probs over).
    """
    trees, origins, truncated, pairs = [], [], 0, 0
    for ex in examples:
        origin = getattr(ex, "origin", "?")
        if len(ex.responses) < 2:
            raise DataError(f"{origin}: a preference example needs at least 2 responses, got {len(ex.responses)}")
        seqs, masks = [], []
        for k, response in enumerate(ex.responses):
            if not isinstance(response, str):
                raise DataError(f"{origin}: response {k} must be a string, got {type(response).__name__}")
            messages = list(ex.prompt) + [{"role": "assistant", "content": response}]
            try:
                ids, mask, cut = render_for_scoring(messages, tokenizer, fmt, max_len, where=f"{origin} response {k}")
            except DataError:
                raise
            except ChatsmithError as exc:
                raise DataError(f"{origin}: {exc}") from None
            seqs.append(ids)
            masks.append(mask)
            truncated += cut
        trees.append(prefix_tree(seqs, masks if with_masks else None, share=share_prompt))
        origins.append(origin)
        pairs += len(ex.responses) * (len(ex.responses) - 1) // 2
    return TokenizedPreferences(trees, origins, truncated, pairs)


def split_train_eval(n: int, eval_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic held-out split of `n` examples: `(train_indices, eval_indices)`, both sorted.

    The split depends only on (n, eval_fraction, seed), so a resumed run or another stage (DPO) given the
    same data holds out the same examples. At least one example is held out when eval_fraction > 0 and
    n >= 2.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ChatsmithError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, n - 1) if n > 1 else 0
    order = np.random.default_rng([seed, n, 7919]).permutation(n)
    return sorted(order[n_eval:].tolist()), sorted(order[:n_eval].tolist())


# ----------------------------------------------------------------------------- scoring API

@dataclass
class RewardModel:
    """A loaded reward model: HF sequence-classification model + tokenizer + chat format + normalisation."""

    model: nn.Module
    tokenizer: Any
    fmt: Any
    mean: float = 0.0
    std: float = 1.0
    path: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """(raw - mean) / std with the normalisation saved at training time."""
        return (raw - self.mean) / self.std

    @torch.no_grad()
    def score_token_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 16,
                        normalize: bool = True) -> torch.Tensor:
        """Scores `(n,)` float32 on CPU of token sequences (each ending at the response's end-of-turn).

        Sequences are sorted by length into right-padded batches (little padding), scored at their last
        real token and returned in the input order. Longer than the model's context: cut from the left.
        """
        n = len(sequences)
        out = torch.empty(n, dtype=torch.float32)
        if n == 0:
            return out
        limit = getattr(self.model.config, "max_position_embeddings", None)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(n), key=lambda i: len(sequences[i]))
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, n, max(1, batch_size)):
                idx = order[start:start + batch_size]
                rows = [list(sequences[i])[-limit:] if limit else list(sequences[i]) for i in idx]
                if any(len(r) == 0 for r in rows):
                    raise ChatsmithError("cannot score an empty token sequence")
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, r in enumerate(rows):
                    ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
                    mask[j, :len(r)] = 1
                raw = sequence_rewards(self.model, ids.to(self.device), mask.to(self.device)).cpu()
                out[torch.tensor(idx)] = raw
        finally:
            self.model.train(was_training)
        return self.normalize(out) if normalize else out


def load_reward_model(path: str | Path, device: str = "auto", dtype: torch.dtype | str | None = None,
                      template: str | None = None) -> RewardModel:
    """Load a reward-model directory written by `chatsmith reward` (or any HF seq-classification dir).

    The normalisation comes from config.json (`chatsmith_reward_mean/std`), else
    reward_normalization.json, else (0, 1). The chat format is the one the model was trained with
    (`template` overrides it; needed only for directories chatsmith did not write).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from chatsmith.chat.templates import get_format
    from chatsmith.utils import resolve_device

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ChatsmithError(f"{path}: not a model directory (no config.json); train one with `chatsmith reward`")
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "auto": None}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    kwargs = {"dtype": dtype} if dtype is not None else {}
    from chatsmith.model import quiet_transformers

    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, **kwargs)
    if getattr(model.config, "num_labels", 1) != 1:
        raise ChatsmithError(f"{path}: a reward model has one output (num_labels=1), this one has "
                             f"{model.config.num_labels}")
    if tokenizer.pad_token_id is None:
        raise ChatsmithError(f"{path}: the tokenizer has no pad token; chatsmith reward models always set one")
    fmt_name = template or getattr(model.config, FORMAT_KEY, None)
    try:
        fmt = get_format(fmt_name, tokenizer)
    except ChatsmithError:
        fmt = get_format(None, tokenizer)
    mean = getattr(model.config, NORM_MEAN_KEY, None)
    std = getattr(model.config, NORM_STD_KEY, None)
    if (mean is None or std is None) and (path / NORM_FILE).is_file():
        saved = json.loads((path / NORM_FILE).read_text())
        mean, std = saved.get("mean"), saved.get("std")
    model.to(resolve_device(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return RewardModel(model, tokenizer, fmt, float(mean if mean is not None else 0.0),
                       float(std if std else 1.0), str(path))


def score_conversations(rm: RewardModel, tokenizer: Any = None, fmt: Any = None,
                        conversations: Sequence[list[dict]] = (), batch_size: int = 16,
                        normalize: bool = True, max_len: int | None = None) -> torch.Tensor:
    """Reward of each conversation's final assistant reply: `(n,)` float32 on CPU.

    Each conversation is a list of messages ending with the assistant reply; it is rendered with the
    RM's chat format (`tokenizer`/`fmt` default to the RM's own; pass them only to override) up to the
    reply's end-of-turn token and scored there. Normalised with the saved (mean, std) unless
    `normalize=False`.
    """
    tokenizer = tokenizer if tokenizer is not None else rm.tokenizer
    fmt = fmt if fmt is not None else rm.fmt
    sequences = []
    for i, messages in enumerate(conversations):
        ids, _, _ = render_for_scoring(list(messages), tokenizer, fmt, max_len, where=f"conversation {i}")
        sequences.append(ids)
    return rm.score_token_ids(sequences, batch_size=batch_size, normalize=normalize)


# ----------------------------------------------------------------------------- training

@dataclass
class RewardConfig(TrainConfig):
    model: str = arg("runs/sft", "SFT model directory to initialise the reward model from.")
    data: str = arg("data/preferences.jsonl", "Preference data: prompt + chosen/rejected, or a ranked list.")
    out: str = arg("runs/rm", "Output directory (HF AutoModelForSequenceClassification dir + metrics).")
    template: str | None = arg(None, "Chat format if the model has none: chatml, llama2, alpaca or a .jinja path.")
    eval_data: str | None = arg(None, "Held-out preference file (default: hold out --eval-fraction of --data).")
    eval_fraction: float = arg(0.05, "Fraction of --data held out for pairwise accuracy (deterministic split).")
    on_bad_row: str = arg("error", "What to do with a malformed data row: error (name it and stop) or skip.",
                          choices=["error", "skip"])
    epochs: float = arg(1.0, "Passes over the training pairs when --max-steps is 0.")
    max_steps: int = arg(0, "Optimizer steps (0 = --epochs passes over the data).")
    lr: float = arg(1e-4, "Peak learning rate (AdamW).")
    warmup_steps: int = arg(5, "Linear warmup steps.")
    batch_size: int = arg(16, "Preference examples (pairs or rankings) per micro-batch.")
    max_len: int = arg(256, "Maximum tokens of one conversation (prompt + response); longer ones lose their start.")
    margin: float = arg(0.0, "Margin m in -logsigmoid(r_chosen - r_rejected - m) (Llama 2).")
    share_prompt: bool = arg(True, "Compute each example's shared prompt once (tree packing); same result.")
    eval_every: int = arg(0, "Evaluate held-out accuracy every N steps (0 = only at the end).")
    save_every: int = arg(50, "Write OUT/checkpoint every N steps (0 = only at the end).")
    log_every: int = arg(5, "Write a metrics row every N steps.")
    norm_source: str = arg("samples", "Normalise rewards on responses sampled from the SFT model ('samples') "
                           "or on the preference responses ('preferences').", choices=["samples", "preferences"])
    norm_samples: int = arg(64, "How many responses to normalise on.")
    norm_max_new_tokens: int = arg(64, "Length limit of the SFT samples used for normalisation.")
    norm_temperature: float = arg(1.0, "Sampling temperature of those samples.")


def _load_preferences(path: str, what: str, on_bad_row: str = "error") -> list[Any]:
    from chatsmith.data.formats import load_examples

    if not Path(path).exists():
        raise ChatsmithError(f"{what} {path}: file not found")
    result = load_examples(path, kind="preference", on_bad_row=on_bad_row)
    if result.bad_rows:
        _note(f"{path}: {result.summary()}")
    if not result.examples:
        raise DataError(f"{path}: no preference examples found ({result.summary()})")
    return list(result.examples)


def steps_for_epochs(n_examples: int, cfg: TrainConfig, epochs: float) -> int:
    """Optimizer steps for `epochs` passes over `n_examples` at the configured global batch."""
    from chatsmith.utils import world_size

    per_step = max(1, cfg.batch_size * cfg.grad_accum * world_size())
    return max(1, math.ceil(n_examples * epochs / per_step))


def _note(message: str) -> None:
    from chatsmith.utils import is_main_process

    if is_main_process():
        print(message, file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate_preferences(model: nn.Module, batches: Sequence[PackedTrees], margin: float = 0.0) -> dict[str, float]:
    """Held-out pairwise accuracy, mean margin r_better - r_worse, and mean loss over packed batches."""
    device = next(model.parameters()).device
    diffs, losses, n_examples = [], 0.0, 0
    from chatsmith.train.batching import move_to_device

    for batch in batches:
        batch = move_to_device(batch, device)
        rewards = packed_rewards(model, batch)
        better, worse, group = expand_rankings(batch.num_responses, device)
        diffs.append((rewards[better] - rewards[worse]).float().cpu())
        losses += float(ranking_loss(rewards, better, worse, group, batch.n_targets, margin).sum())
        n_examples += batch.n_targets
    if not diffs:
        return {}
    diff = torch.cat(diffs)
    return {"accuracy": float(pairwise_accuracy(diff, torch.zeros_like(diff))), "margin": float(diff.mean()),
            "loss": losses / max(1, n_examples), "pairs": float(diff.numel())}


class TreeCollate:
    """Picklable collate: pack a batch of trees (capacity = its longest tree)."""

    def __init__(self, pad_id: int, with_targets: bool = False):
        self.pad_id, self.with_targets = pad_id, with_targets

    def __call__(self, trees: list[PrefixTree]) -> PackedTrees:
        return pack_trees(trees, self.pad_id, with_targets=self.with_targets)


def make_reward_loss(margin: float = 0.0):
    """`loss_fn(model, batch) -> (sum of per-example losses, n_examples, metrics)` for the Trainer."""

    def loss_fn(model: nn.Module, batch: PackedTrees):
        rewards = packed_rewards(model, batch)
        better, worse, group = expand_rankings(batch.num_responses, rewards.device)
        per_example = ranking_loss(rewards, better, worse, group, batch.n_targets, margin)
        diff = (rewards[better] - rewards[worse]).detach()
        # Means over pairs and over responses, not over examples: (sum, count) for the Trainer.
        n_pairs = int(diff.numel())
        metrics = {"accuracy": (float(pairwise_accuracy(diff, torch.zeros_like(diff))) * n_pairs, n_pairs),
                   "margin": (float(diff.sum()), n_pairs),
                   "reward_mean": (float(rewards.detach().sum()), int(rewards.numel()))}
        return per_example.sum(), batch.n_targets, metrics

    return loss_fn


@torch.no_grad()
def accuracy_by_group(model: nn.Module, trees: Sequence[PrefixTree], metas: Sequence[dict], pad_id: int,
                      batch_size: int) -> dict[str, dict[str, float]]:
    """Held-out pairwise accuracy per data group (the row's `aspect`, else `category`, e.g. rude/wrong/lazy)."""
    from chatsmith.train.batching import move_to_device

    if not trees:
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct: dict[str, list[float]] = {}
    try:
        for start in range(0, len(trees), batch_size):
            chunk = list(trees[start:start + batch_size])
            rewards = packed_rewards(model, move_to_device(pack_trees(chunk, pad_id), device)).cpu()
            offset = 0
            for i, tree in enumerate(chunk):
                meta = metas[start + i]
                group = str(meta.get("aspect") or meta.get("category") or "all")
                k = len(tree.suffixes)
                r = rewards[offset:offset + k]
                offset += k
                better, worse, _ = expand_rankings([k])
                diff = r[better] - r[worse]
                correct.setdefault(group, []).extend(((diff > 0).float() + 0.5 * (diff == 0).float()).tolist())
    finally:
        model.train(was_training)
    return {g: {"accuracy": sum(v) / len(v), "pairs": len(v)} for g, v in sorted(correct.items())}


def _sample_sft_responses(causal_lm: nn.Module, tokenizer: Any, fmt: Any, prompts: list[list[dict]],
                          cfg: RewardConfig, device: str) -> list[list[dict]] | None:
    """Conversations (prompt + one sampled reply) from the SFT model, or None if sampling is unavailable."""
    try:
        from chatsmith.chat.render import render_prompt
        from chatsmith.generate import SamplingConfig, generate
    except ImportError as exc:
        _note(f"reward: sampling unavailable ({exc}); normalising on the preference responses")
        return None
    prompt_ids = [render_prompt(p, tokenizer, fmt) for p in prompts]
    limit = max(8, cfg.max_len - cfg.norm_max_new_tokens)
    prompt_ids = [ids[-limit:] for ids in prompt_ids]
    sampling = SamplingConfig(max_new_tokens=cfg.norm_max_new_tokens, temperature=cfg.norm_temperature,
                              seed=cfg.seed, stop_token_ids=tuple(fmt.stop_token_ids(tokenizer)),
                              stop_strings=tuple(fmt.stop_strings))
    causal_lm.to(device).eval()
    out = generate(causal_lm, tokenizer, prompt_ids, sampling)
    return [list(p) + [{"role": "assistant", "content": text}] for p, text in zip(prompts, out.texts)]


def train_reward_model(cfg: RewardConfig) -> dict[str, Any]:
    """`chatsmith reward`: train, evaluate, normalise and save a reward model. Returns the final metrics."""
    from chatsmith.model import load_model
    from chatsmith.train.batching import ShardedBatchSource
    from chatsmith.train.checkpoint import save_final_model
    from chatsmith.train.supervised import Trainer
    from chatsmith.utils import MetricsLogger, atomic_write_text, resolve_device, set_seed

    set_seed(cfg.seed)
    examples = _load_preferences(cfg.data, "--data", cfg.on_bad_row)
    if cfg.eval_data:
        train_examples, eval_examples = examples, _load_preferences(cfg.eval_data, "--eval-data", cfg.on_bad_row)
    else:
        train_idx, eval_idx = split_train_eval(len(examples), cfg.eval_fraction, seed=0)
        train_examples = [examples[i] for i in train_idx]
        eval_examples = [examples[i] for i in eval_idx]
    loaded = load_model(cfg.model, device="cpu", template=cfg.template)
    causal_lm, tokenizer, fmt = loaded.model, loaded.tokenizer, loaded.fmt
    if tokenizer.pad_token_id is None:
        raise ChatsmithError(f"{cfg.model}: the tokenizer has no pad token")
    train_tok = tokenize_preferences(train_examples, tokenizer, fmt, cfg.max_len, share_prompt=cfg.share_prompt)
    eval_tok = tokenize_preferences(eval_examples, tokenizer, fmt, cfg.max_len, share_prompt=cfg.share_prompt)
    if train_tok.n_truncated or eval_tok.n_truncated:
        _note(f"reward: {train_tok.n_truncated + eval_tok.n_truncated} conversation(s) longer than --max-len "
              f"{cfg.max_len} lost tokens from the start of their prompt")
    if cfg.max_steps <= 0:
        cfg = dataclasses.replace(cfg, max_steps=steps_for_epochs(len(train_tok.trees), cfg, cfg.epochs))
    _note(f"reward: {len(train_tok.trees)} training examples ({train_tok.n_pairs} pairs), "
          f"{len(eval_tok.trees)} held out ({eval_tok.n_pairs} pairs); {cfg.max_steps} steps")

    device = resolve_device(cfg.device)
    norm_conversations = None
    if cfg.norm_source == "samples" and cfg.norm_samples > 0:
        prompts = [list(ex.prompt) for ex in train_examples + eval_examples]
        pick = np.random.default_rng([cfg.seed, 17]).permutation(len(prompts))[:cfg.norm_samples]
        norm_conversations = _sample_sft_responses(causal_lm, tokenizer, fmt, [prompts[i] for i in pick],
                                                   cfg, device)
    norm_source = "sft_samples" if norm_conversations is not None else "preference_responses"

    model = reward_model_from_causal_lm(causal_lm.cpu(), tokenizer, seed=cfg.seed)
    setattr(model.config, FORMAT_KEY, getattr(fmt, "name", None))
    del causal_lm, loaded

    pad_id = tokenizer.pad_token_id
    source = ShardedBatchSource(train_tok.trees, cfg.batch_size, collate=TreeCollate(pad_id), seed=cfg.seed)
    eval_batches = [pack_trees(eval_tok.trees[i:i + cfg.batch_size], pad_id)
                    for i in range(0, len(eval_tok.trees), cfg.batch_size)]
    trainer = Trainer(cfg, model, tokenizer, source, make_reward_loss(cfg.margin),
                      eval_fn=(lambda m: evaluate_preferences(m, eval_batches, cfg.margin)) if eval_batches else None,
                      stage="reward", count_fn=lambda b: b.n_targets, token_count_fn=lambda b: b.n_tokens,
                      save_final=False)
    result = trainer.run()
    model = trainer.unsharded_model()
    model.eval()

    # Normalisation: mean 0 / std 1 on what the policy will produce at the start of RL.
    probe = RewardModel(model, tokenizer, fmt)
    if norm_conversations is not None:
        raw = score_conversations(probe, tokenizer, fmt, norm_conversations, cfg.batch_size, normalize=False,
                                  max_len=cfg.max_len)
    else:
        from chatsmith.train.batching import move_to_device

        trees = train_tok.trees + eval_tok.trees
        with torch.no_grad():
            raw = torch.cat([packed_rewards(model, move_to_device(pack_trees(trees[i:i + cfg.batch_size], pad_id),
                                                                  next(model.parameters()).device)).cpu()
                             for i in range(0, len(trees), cfg.batch_size)])
    mean = float(raw.mean())
    std = float(raw.std()) if raw.numel() > 1 else 1.0
    std = std if std > 1e-6 else 1.0
    setattr(model.config, NORM_MEAN_KEY, mean)
    setattr(model.config, NORM_STD_KEY, std)
    model.config.pad_token_id = pad_id
    final = {f"eval_{k}" if not k.startswith("eval") else k: v for k, v in (result.eval or {}).items()}
    by_group = accuracy_by_group(model, eval_tok.trees, [getattr(ex, "meta", {}) or {} for ex in eval_examples],
                                 pad_id, cfg.batch_size)
    final.update({"reward_mean": mean, "reward_std": std, "reward_norm_source": norm_source,
                  "reward_norm_count": int(raw.numel()), "train_examples": len(train_tok.trees),
                  "train_pairs": train_tok.n_pairs, "eval_examples": len(eval_tok.trees),
                  "eval_pairs": eval_tok.n_pairs, "truncated": train_tok.n_truncated + eval_tok.n_truncated})
    summary = dict(final, eval_accuracy_by_group=by_group)
    norm_json = json.dumps({"mean": mean, "std": std, "source": norm_source, "count": int(raw.numel())}, indent=1)
    from chatsmith.utils import barrier, is_main_process

    if is_main_process():
        # into --out, keeping metrics.jsonl and checkpoint/ beside the model (see loop.save_final_model)
        save_final_model(model.cpu(), tokenizer, Path(cfg.out), {NORM_FILE: norm_json + "\n"})
        MetricsLogger(cfg.out, stage="reward").log(result.step, **final)
        atomic_write_text(Path(cfg.out) / "reward_summary.json", json.dumps(summary, indent=1) + "\n")
    barrier()   # a caller on another rank (rlhf) reads the model next
    acc = final.get("eval_accuracy")
    _note(f"reward: saved {cfg.out}" + (f"; held-out pairwise accuracy {acc:.1%}, mean margin "
                                       f"{final.get('eval_margin', float('nan')):.3f}" if acc is not None else "")
          + f"; normalised on {norm_source} (mean {mean:.3f}, std {std:.3f})")
    return summary


# ----------------------------------------------------------------------------- chatsmith score

@dataclass
class ScoreConfig:
    reward_model: str = arg("runs/rm", "Reward-model directory (from `chatsmith reward`).")
    data: str = arg("responses.jsonl", "Conversations to score (messages format), each ending with the reply.")
    out: str | None = arg(None, "Write one JSON line per conversation (origin, score, raw_score) here.")
    batch_size: int = arg(16, "Conversations per forward pass.")
    normalize: bool = arg(True, "Apply the saved normalisation (mean 0 / std 1 on SFT samples).")
    template: str | None = arg(None, "Override the reward model's chat format.")
    on_bad_row: str = arg("error", "What to do with a malformed row: error (name it and stop) or skip.",
                          choices=["error", "skip"])
    device: str = arg("auto", "cpu, cuda, mps or auto.")


def score(cfg: ScoreConfig) -> dict[str, Any]:
    """`chatsmith score RM --data FILE`: print (and optionally write) a reward per conversation."""
    from chatsmith.data.formats import load_examples
    from chatsmith.utils import write_jsonl

    if not Path(cfg.data).is_file():
        raise ChatsmithError(f"--data {cfg.data}: file not found")
    rm = load_reward_model(cfg.reward_model, device=cfg.device, template=cfg.template)
    result = load_examples(cfg.data, kind="chat", on_bad_row=cfg.on_bad_row)
    if result.bad_rows:
        print(f"{cfg.data}: {result.summary()}", file=sys.stderr)
    conversations, origins = [], []
    for ex in result.examples:
        if not ex.messages or ex.messages[-1].get("role") != "assistant":
            raise DataError(f"{ex.origin}: the last message must be the assistant reply to score")
        conversations.append(ex.messages)
        origins.append(ex.origin)
    raw = score_conversations(rm, rm.tokenizer, rm.fmt, conversations, cfg.batch_size, normalize=False)
    scores = rm.normalize(raw) if cfg.normalize else raw
    rows = [{"origin": o, "score": round(float(s), 6), "raw_score": round(float(r), 6)}
            for o, s, r in zip(origins, scores, raw)]
    if cfg.out:
        write_jsonl(cfg.out, rows)
    width = max([len("origin")] + [len(o) for o in origins])
    print(f"{'origin'.ljust(width)}  score")
    for row in rows:
        print(f"{row['origin'].ljust(width)}  {row['score']:+.4f}")
    summary = {"n": len(rows), "mean": float(scores.mean()) if rows else float("nan"),
               "std": float(scores.std()) if len(rows) > 1 else 0.0}
    print(f"{summary['n']} conversation(s); mean score {summary['mean']:+.4f}, std {summary['std']:.4f}"
          + (f"; wrote {cfg.out}" if cfg.out else ""))
    return summary
