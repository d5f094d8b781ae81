"""Reward-model training: Bradley-Terry on pairwise or ranked preferences, and `chatsmith score`.

    chatsmith reward --model runs/sft --data preferences.jsonl --out runs/rm
    chatsmith score runs/rm --data responses.jsonl --out scores.jsonl

Training (`train_reward_model`): the reward model is the SFT model's transformer with a scalar head
(`AutoModelForSequenceClassification`, num_labels=1) read at the last real token of each conversation
(see `chatsmith.reward_model`, which loads and scores the result).
Loss `-logsigmoid(r_chosen - r_rejected - margin)` (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1); a
K-way ranking is one batch element whose K responses are each scored once and give all C(K, 2) pairs.
All responses of an example sit in the same forward batch; their shared prompt is computed once
(prefix-tree packing, `preference_functional.pack_trees`). One epoch by default, through the shared
`train/supervised.py` Trainer (checkpoints, `--resume`, metrics). A deterministic held-out split gives
pairwise accuracy and mean margin. Afterwards rewards are normalised to mean 0 / std 1 on responses
sampled from the SFT model (or on the preference responses with `--norm-source preferences`;
`reward_norm_source` in metrics.jsonl says which), and the (mean, std) is stored in config.json as
`chatsmith_reward_mean` / `chatsmith_reward_std` and in `reward_normalization.json`. The output is a
standard HF directory that plain `transformers.AutoModelForSequenceClassification` loads (with `--lora-r`: a
peft adapter directory of task SEQ_CLS holding the adapters and the score head, plus reward_normalization.json;
`chatsmith merge` turns it into a plain reward-model directory).

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

from chatsmith.config import arg, validate_config
from chatsmith.errors import ChatsmithError, DataError
from chatsmith.model import disable_dropout
from chatsmith.reward_model import (ENSEMBLE_FILE, FORMAT_KEY, NORM_FILE, NORM_MEAN_KEY, NORM_STD_KEY, RewardModel,
                                    backbone, load_reward_model, packed_rewards, score_conversations, score_head)
from chatsmith.train.lora import apply_lora, lora_enabled
from chatsmith.train.preference_data import PreferenceConfig, load_preference_split, tokenize_preference_split
from chatsmith.train.preference_functional import (PackedTrees, PrefixTree, expand_rankings, pack_trees,
                                                   pairwise_accuracy, ranking_loss)
from chatsmith.utils import atomic_write_text, barrier, is_main_process, note

__all__ = [
    "RewardConfig", "train_reward_model", "ScoreConfig", "score", "reward_model_from_causal_lm",
    "TreeCollate", "make_reward_loss", "evaluate_preferences",
    "accuracy_by_group",
]


ENSEMBLE_MEMBERS = "members"   # OUT/members/member-K: the other reward models of --ensemble N

# ----------------------------------------------------------------------------- model init

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
    disable_dropout(config)
    rm = AutoModelForSequenceClassification.from_config(config)
    missing, unexpected = backbone(rm).load_state_dict(backbone(causal_lm).state_dict(), strict=False)
    if missing or unexpected:
        raise ChatsmithError(f"cannot initialise the reward model from {type(causal_lm).__name__}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    head = score_head(rm)
    hidden = head.weight.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / math.sqrt(hidden + 1))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    rm.to(next(causal_lm.parameters()).dtype)
    return rm


# ----------------------------------------------------------------------------- training

@dataclass
class RewardConfig(PreferenceConfig):
    model: str = arg("runs/sft", "SFT model directory to initialise the reward model from.")
    out: str = arg("runs/rm", "Output directory (HF AutoModelForSequenceClassification dir + metrics).")
    lr: float = arg(1e-4, "Peak learning rate (AdamW).")
    margin: float = arg(0.0, "Margin m in -logsigmoid(r_chosen - r_rejected - m) (Llama 2).", min=0)
    norm_source: str = arg("samples", "Normalise rewards on responses sampled from the SFT model ('samples') "
                           "or on the preference responses ('preferences').", choices=["samples", "preferences"])
    norm_samples: int = arg(64, "How many responses to normalise on.", min=0)
    norm_max_new_tokens: int = arg(64, "Length limit of the SFT samples used for normalisation.", min=1)
    norm_temperature: float = arg(1.0, "Sampling temperature of those samples.", min=0, min_exclusive=True)
    ensemble: int = arg(1, "Train N reward models that differ only in their seed (--seed, --seed + 1, ...): the "
                        "first in OUT, the others in OUT/members/; PPO, GRPO and eval given OUT score with the mean "
                        "of their normalised scores (Coste et al. 2024: less reward over-optimisation).", min=1)


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
                          cfg: RewardConfig, device: str) -> list[list[dict]]:
    """Conversations (prompt + one sampled reply) from the SFT model."""
    from chatsmith.chat.render import render_prompt
    from chatsmith.generate import SamplingConfig, generate

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
    """`chatsmith reward`: train, evaluate, normalise and save a reward model (with --ensemble N, N of them).
    Returns the final metrics (of the first member, with `ensemble_eval_accuracy` listing every member's)."""
    validate_config(cfg)              # every setting, before any work (Python callers too)
    summary = _train_one_reward_model(cfg)
    file = Path(cfg.out) / ENSEMBLE_FILE
    if cfg.ensemble == 1:
        if file.is_file() and is_main_process():
            file.unlink()             # OUT trained again as a single model: its old members no longer count
        return summary
    names, accuracies = [], [summary.get("eval_accuracy")]
    for k in range(1, cfg.ensemble):
        name = f"{ENSEMBLE_MEMBERS}/member-{k}"
        note(f"reward: ensemble member {k + 1} of {cfg.ensemble} (seed {cfg.seed + k}) in {Path(cfg.out) / name}")
        member = _train_one_reward_model(dataclasses.replace(cfg, seed=cfg.seed + k, ensemble=1,
                                                             out=str(Path(cfg.out) / name)))
        names.append(name)
        accuracies.append(member.get("eval_accuracy"))
    if is_main_process():
        atomic_write_text(file, json.dumps({"members": names}, indent=1) + "\n")
    barrier()
    summary["ensemble_eval_accuracy"] = accuracies
    note(f"reward: ensemble of {cfg.ensemble} in {cfg.out} (held-out accuracy of each: "
         + ", ".join("n/a" if a is None else f"{a:.1%}" for a in accuracies) + ")")
    return summary


def _train_one_reward_model(cfg: RewardConfig) -> dict[str, Any]:
    from chatsmith.model import load_model
    from chatsmith.train.batching import ShardedBatchSource
    from chatsmith.train.checkpoint import save_final_model
    from chatsmith.train.supervised import Trainer
    from chatsmith.utils import MetricsLogger, resolve_device, set_seed

    set_seed(cfg.seed)
    train_examples, eval_examples = load_preference_split(cfg)
    loaded = load_model(cfg.model, device="cpu", template=cfg.template)
    causal_lm, tokenizer, fmt = loaded.model, loaded.tokenizer, loaded.fmt
    if tokenizer.pad_token_id is None:
        raise ChatsmithError(f"{cfg.model}: the tokenizer has no pad token")
    cfg, train_tok, eval_tok = tokenize_preference_split(cfg, train_examples, eval_examples, tokenizer, fmt,
                                                         stage="reward")

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
    if lora_enabled(cfg):          # adapters plus the score head (peft's modules_to_save)
        model = apply_lora(model, cfg, base=cfg.model, task="reward")

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
    metas = [getattr(eval_examples[i], "meta", {}) or {} for i in eval_tok.kept]   # the examples not dropped
    by_group = accuracy_by_group(model, eval_tok.trees, metas, pad_id, cfg.batch_size)
    final.update({"reward_mean": mean, "reward_std": std, "reward_norm_source": norm_source,
                  "reward_norm_count": int(raw.numel()), "train_examples": len(train_tok.trees),
                  "train_pairs": train_tok.n_pairs, "eval_examples": len(eval_tok.trees),
                  "eval_pairs": eval_tok.n_pairs, "dropped_long": train_tok.n_dropped + eval_tok.n_dropped})
    summary = dict(final, eval_accuracy_by_group=by_group)
    norm_json = json.dumps({"mean": mean, "std": std, "source": norm_source, "count": int(raw.numel())}, indent=1)
    if is_main_process():
        # into --out, keeping metrics.jsonl and checkpoint/ beside the model (see loop.save_final_model)
        save_final_model(model.cpu(), tokenizer, Path(cfg.out), {NORM_FILE: norm_json + "\n"})
        MetricsLogger(cfg.out, stage="reward").log(result.step, **final)
        atomic_write_text(Path(cfg.out) / "reward_summary.json", json.dumps(summary, indent=1) + "\n")
    barrier()   # a caller on another rank (rlhf) reads the model next
    acc = final.get("eval_accuracy")
    note(f"reward: saved {cfg.out}" + (f"; held-out pairwise accuracy {acc:.1%}, mean margin "
                                      f"{final.get('eval_margin', float('nan')):.3f}" if acc is not None else "")
         + f"; normalised on {norm_source} (mean {mean:.3f}, std {std:.3f})")
    return summary


# ----------------------------------------------------------------------------- chatsmith score

@dataclass
class ScoreConfig:
    reward_model: str = arg("runs/rm", "Reward-model directory (from `chatsmith reward`).")
    data: str = arg("responses.jsonl", "Conversations to score (messages format), each ending with the reply.")
    out: str | None = arg(None, "Write one JSON line per conversation (origin, score, raw_score) here.")
    batch_size: int = arg(16, "Conversations per forward pass.", min=1)
    normalize: bool = arg(True, "Apply the saved normalisation (mean 0 / std 1 on SFT samples).")
    template: str | None = arg(None, "Override the reward model's chat format.")
    on_bad_row: str = arg("error", "What to do with a malformed row: error (name it and stop) or skip.",
                          choices=["error", "skip"])
    device: str = arg("auto", "cpu, cuda, mps or auto.")


def score(cfg: ScoreConfig) -> dict[str, Any]:
    """`chatsmith score RM --data FILE`: print (and optionally write) a reward per conversation."""
    validate_config(cfg)
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
