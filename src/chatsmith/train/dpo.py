"""Direct Preference Optimization: fine-tune a chat model on preferences without a reward model.

    chatsmith dpo --model runs/sft --data preferences.jsonl --out runs/dpo [--beta 0.1]

Loss (Rafailov et al. 2023, eq. 7): `-logsigmoid(beta * [(log pi(y_c|x) - log ref(y_c|x)) -
(log pi(y_r|x) - log ref(y_r|x))])`, where log pi(y|x) is the SUM of the response tokens' log-probs
(the final reply and its end-of-turn token, i.e. the assistant mask of `render_chat`). The reference is
the SFT model itself: its log-probs are computed ONCE, before training, with the starting weights (no
second model is kept in memory; on `--resume` they are recomputed from `--model`, not from the
checkpoint). K-way rankings give all C(K, 2) pairs within one example, each response's log-prob
computed once, the loss averaged per example (as InstructGPT does for reward models). The prompt shared
by an example's responses is computed once (tree packing) and logits are computed only at positions
whose next token is a response token. Optional: conservative DPO (`--label-smoothing`, Mitchell 2023),
IPO (`--loss-type ipo`, Azar et al. 2023) and RPO (`--rpo-alpha`: plus the best response's per-token NLL,
Pang et al. 2024).

Reports per step and on a held-out split: implicit reward accuracy (share of pairs where
beta * log(pi/ref) ranks the chosen response higher), mean implicit reward margin, chosen/rejected
rewards and log-probs. Checkpoints and `--resume` go through the shared `train/supervised.py` Trainer; the
result in `--out` is a standard HF chat model directory. With `--lora-r R` the policy trains LoRA adapters and
the reference log-probs come from the same weights with the adapters disabled (no second copy); `--out` is
then a peft adapter directory.

Run the tests: `python -m pytest tests/test_dpo.py -q`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from chatsmith.config import arg, validate_config
from chatsmith.errors import ChatsmithError
from chatsmith.model import EMBEDDING_MODES, TRAIN_EMBEDDINGS_HELP, restrict_embedding_training
from chatsmith.reward_model import backbone_hidden
from chatsmith.train.lora import adapter_disabled, apply_lora, lora_enabled
from chatsmith.train.preference_data import PreferenceConfig, load_preference_split, tokenize_preference_split
from chatsmith.train.preference_functional import (PackedTrees, PrefixTree, chosen_nll, dpo_loss, expand_rankings,
                                                   pack_trees, segment_mean, segment_sum, token_logprobs)
from chatsmith.utils import note

__all__ = ["DPOConfig", "dpo", "DPOBatch", "DPOCollate", "packed_logprobs", "reference_logprobs", "make_dpo_loss",
           "evaluate_dpo"]


@dataclass
class DPOConfig(PreferenceConfig):
    model: str = arg("runs/sft", "SFT model directory: the starting policy and the frozen reference.")
    out: str = arg("runs/dpo", "Output directory (HF chat model dir + metrics).")
    beta: float = arg(0.1, "DPO beta: strength of the implicit KL to the reference (Rafailov et al. 2023).",
                      min=0, min_exclusive=True)
    loss_type: str = arg("sigmoid", "sigmoid (DPO) or ipo (Azar et al. 2023).", choices=["sigmoid", "ipo"])
    label_smoothing: float = arg(0.0, "Conservative DPO: probability that a preference label is flipped.",
                                 min=0, max=0.5, max_exclusive=True)
    rpo_alpha: float = arg(0.0, "Weight of the chosen (best) response's per-token NLL added to the DPO loss "
                                "(RPO, Pang et al. 2024; TRL's rpo_alpha, 1.0 in the paper): keeps DPO from "
                                "lowering the chosen replies' likelihood too. 0: plain DPO.", min=0)
    lr: float = arg(5e-5, "Peak learning rate (AdamW).")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    train_embeddings: str = arg("seen", TRAIN_EMBEDDINGS_HELP, choices=list(EMBEDDING_MODES))


@dataclass
class DPOBatch:
    """A packed batch plus the precomputed reference log-probs of its conversations `(n,)`."""

    packed: PackedTrees
    reference_logps: torch.Tensor

    @property
    def n_targets(self) -> int:
        return self.packed.n_targets

    @property
    def n_tokens(self) -> int:
        return self.packed.n_tokens


def packed_logprobs(model: nn.Module, batch: PackedTrees) -> torch.Tensor:
    """Summed response log-probs `(n,)` float32 of every conversation in a packed batch (with targets).

    Runs the transformer once over the packed rows, then the LM head only on the `(m, h)` hidden states
    that predict a response token. Assumes logits = lm_head(hidden) (Llama, Qwen2, Mistral, GPT-2).
    """
    if batch.logit_index is None:
        raise ChatsmithError("packed_logprobs needs a batch packed with with_targets=True")
    hidden = backbone_hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids)
    picked = hidden.reshape(-1, hidden.shape[-1])[batch.logit_index]
    logits = model.get_output_embeddings()(picked)
    logp = token_logprobs(logits, batch.target_ids)
    return segment_sum(logp, batch.target_response, len(batch.last_token))


class DPOCollate:
    """Picklable collate: (tree, reference log-probs) items -> DPOBatch."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[PrefixTree, torch.Tensor]]) -> DPOBatch:
        packed = pack_trees([tree for tree, _ in items], self.pad_id, with_targets=True)
        return DPOBatch(packed, torch.cat([ref for _, ref in items]))


@torch.no_grad()
def reference_logprobs(model: nn.Module, trees: Sequence[PrefixTree], pad_id: int, batch_size: int,
                       device: str, amp_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Per tree, the `(K,)` summed response log-probs under `model` (the frozen reference), on CPU."""
    from chatsmith.train.batching import move_to_device
    from chatsmith.train.devices import autocast_context

    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(trees), batch_size):
            chunk = list(trees[start:start + batch_size])
            packed = move_to_device(pack_trees(chunk, pad_id, with_targets=True), device)
            with autocast_context(device, amp_dtype):
                logps = packed_logprobs(model, packed).float().cpu()
            out.extend(torch.split(logps, [len(t.suffixes) for t in chunk]))
    finally:
        model.train(was_training)
    return out


def response_token_counts(packed: PackedTrees) -> torch.Tensor:
    """Response tokens `(n,)` of each conversation of a batch packed with targets."""
    n = len(packed.last_token)
    return torch.bincount(packed.target_response, minlength=n)[:n]


def _pairwise_stats(policy_logps: torch.Tensor, reference_logps: torch.Tensor, packed: PackedTrees,
                    cfg: DPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example DPO loss `(g,)` (plus `rpo_alpha` x the best response's per-token NLL) and per-pair
    statistics, from per-conversation log-probs `(n,)`."""
    num_responses = packed.num_responses
    better, worse, group = expand_rankings(num_responses, policy_logps.device)
    losses, chosen_r, rejected_r = dpo_loss(policy_logps[better], policy_logps[worse], reference_logps[better],
                                            reference_logps[worse], beta=cfg.beta,
                                            label_smoothing=cfg.label_smoothing, loss_type=cfg.loss_type)
    per_example = segment_mean(losses, group, len(num_responses))
    stats = {"chosen_reward": chosen_r, "rejected_reward": rejected_r,
             "chosen_logp": policy_logps[better].detach(), "rejected_logp": policy_logps[worse].detach()}
    if cfg.rpo_alpha:
        nll = chosen_nll(policy_logps, response_token_counts(packed), num_responses)
        per_example = per_example + cfg.rpo_alpha * nll
        stats["chosen_nll"] = nll.detach()
    return per_example, stats


def _pair_sums(stats: dict[str, torch.Tensor]) -> dict[str, tuple[float, int]]:
    """(sum, count) over pairs (a ranking contributes all its pairs), for the Trainer to reduce exactly."""
    margin = stats["chosen_reward"] - stats["rejected_reward"]
    n = int(margin.numel())
    sums = {"reward_accuracy": (float((margin > 0).float().sum()), n), "reward_margin": (float(margin.sum()), n),
            **{k: (float(stats[k].sum()), n) for k in ("chosen_reward", "rejected_reward", "chosen_logp",
                                                       "rejected_logp")}}
    if "chosen_nll" in stats:            # per example, not per pair
        sums["chosen_nll"] = (float(stats["chosen_nll"].sum()), int(stats["chosen_nll"].numel()))
    return sums


def _summarise(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: total / max(1, n) for k, (total, n) in _pair_sums(stats).items()}


def make_dpo_loss(cfg: DPOConfig):
    """`loss_fn(model, DPOBatch) -> (sum of per-example losses, n_examples, metrics)` for the Trainer."""

    def loss_fn(model: nn.Module, batch: DPOBatch):
        policy = packed_logprobs(model, batch.packed)
        per_example, stats = _pairwise_stats(policy, batch.reference_logps.to(policy.device), batch.packed, cfg)
        return per_example.sum(), batch.n_targets, _pair_sums(stats)

    return loss_fn


@torch.no_grad()
def evaluate_dpo(model: nn.Module, batches: Sequence[DPOBatch], cfg: DPOConfig) -> dict[str, float]:
    """Held-out DPO loss, implicit reward accuracy and margin over pre-collated batches."""
    from chatsmith.train.batching import move_to_device

    device = next(model.parameters()).device
    total, n = 0.0, 0
    collected: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        batch = move_to_device(batch, device)
        policy = packed_logprobs(model, batch.packed)
        per_example, stats = _pairwise_stats(policy, batch.reference_logps, batch.packed, cfg)
        total += float(per_example.sum())
        n += batch.n_targets
        for k, v in stats.items():
            collected.setdefault(k, []).append(v.float().cpu())
    if not n:
        return {}
    return {"loss": total / n, **_summarise({k: torch.cat(v) for k, v in collected.items()})}


def dpo(cfg: DPOConfig) -> dict[str, Any]:
    """`chatsmith dpo`: train the policy with DPO against its own starting weights; returns final metrics."""
    validate_config(cfg)              # every setting, before any work (Python callers too)
    from chatsmith.model import load_model
    from chatsmith.train.batching import ShardedBatchSource
    from chatsmith.train.devices import resolve_dtype
    from chatsmith.train.supervised import Trainer
    from chatsmith.utils import atomic_write_text, is_main_process, resolve_device, set_seed, world_size

    if cfg.beta <= 0:
        raise ChatsmithError(f"--beta must be > 0, got {cfg.beta}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ChatsmithError(f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    set_seed(cfg.seed)
    train_examples, eval_examples = load_preference_split(cfg)
    loaded = load_model(cfg.model, device="cpu", template=cfg.template)
    model, tokenizer, fmt = loaded.model, loaded.tokenizer, loaded.fmt
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise ChatsmithError(f"{cfg.model}: DPO needs a causal LM with an output (LM) head")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cfg, train_tok, eval_tok = tokenize_preference_split(cfg, train_examples, eval_examples, tokenizer, fmt,
                                                         stage="dpo", with_masks=True, detail=f", beta {cfg.beta}")

    # A run shorter than one epoch sees a seeded subset of the examples: only those need reference
    # log-probs (precomputing all of them cost more than the training itself in the quick demo).
    needed = cfg.max_steps * cfg.batch_size * cfg.grad_accum * world_size()
    train_trees = train_tok.trees
    if needed < len(train_trees):
        keep = sorted(np.random.default_rng([cfg.seed, 11]).permutation(len(train_trees))[:needed].tolist())
        train_trees = [train_trees[i] for i in keep]
        note(f"dpo: {cfg.max_steps} steps use {needed} of the {len(train_tok.trees)} training examples "
             f"(a seeded subset; --epochs or more --max-steps for all)")

    # Reference log-probs, once, from the starting (SFT) weights; the reference is not kept afterwards.
    device = resolve_device(cfg.device)
    amp = resolve_dtype(cfg.dtype, device)
    # With LoRA the reference is the same weights with the adapters disabled (no second copy).
    lora = lora_enabled(cfg)
    if lora:
        model = apply_lora(model, cfg, base=cfg.model)
    model.to(device)
    with adapter_disabled(model):
        ref_train = reference_logprobs(model, train_trees, pad_id, cfg.batch_size, device, amp)
        ref_eval = reference_logprobs(model, eval_tok.trees, pad_id, cfg.batch_size, device, amp)
    if not lora:
        restrict_embedding_training(model, tokenizer, fmt, cfg.train_embeddings, seen_ids={
            i for tree in train_trees for seq in (tree.prefix, *tree.suffixes) for i in seq})
    note(f"dpo: reference log-probs computed for {sum(len(r) for r in ref_train + ref_eval)} responses")

    collate = DPOCollate(pad_id)
    items = list(zip(train_trees, ref_train))
    source = ShardedBatchSource(items, cfg.batch_size, collate=collate, seed=cfg.seed)
    eval_items = list(zip(eval_tok.trees, ref_eval))
    eval_batches = [collate(eval_items[i:i + cfg.batch_size]) for i in range(0, len(eval_items), cfg.batch_size)]
    trainer = Trainer(cfg, model, tokenizer, source, make_dpo_loss(cfg),
                      eval_fn=(lambda m: evaluate_dpo(m, eval_batches, cfg)) if eval_batches else None,
                      stage="dpo", count_fn=lambda b: b.n_targets, token_count_fn=lambda b: b.n_tokens)
    result = trainer.run()
    final = {k if k.startswith("eval") else f"eval_{k}": v for k, v in (result.eval or {}).items()}
    final.update({"train_examples": len(train_tok.trees), "train_pairs": train_tok.n_pairs,
                  "eval_examples": len(eval_tok.trees), "eval_pairs": eval_tok.n_pairs, "beta": cfg.beta,
                  "steps": result.step, "final_train_loss": result.loss})
    if is_main_process():
        atomic_write_text(Path(cfg.out) / "dpo_summary.json", json.dumps(final, indent=1) + "\n")
    if "eval_reward_accuracy" in final:
        note(f"dpo: saved {cfg.out}; held-out implicit reward accuracy {final['eval_reward_accuracy']:.1%}, "
             f"margin {final['eval_reward_margin']:.3f}")
    return final
