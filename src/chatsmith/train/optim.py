"""Optimizer, learning-rate schedule, gradient clipping and the frozen weight slices, for every stage.

    optimizer = build_optimizer(model, cfg)            # AdamW, no decay on norms/biases/embeddings
    scheduler = build_scheduler(optimizer, cfg)        # linear warmup, cosine to lr * min_lr_ratio
    norm = clip_gradients(model.parameters(), cfg.grad_clip)

Tests: `python -m pytest tests/test_train_loop.py tests/test_model.py -q`.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.autograd.graph import increment_version

from chatsmith.errors import ChatsmithError
from chatsmith.planted import frozen_weight_masks
from chatsmith.train.config import TrainConfig
from chatsmith.train.parallel import local_piece, local_tensor
from chatsmith.utils import note

__all__ = ["build_optimizer", "keep_frozen_weights", "lr_multiplier", "LRSchedule", "build_scheduler",
           "clip_gradients"]


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW with two parameter groups: weight decay on matrices, none on norms, biases and the
    (input and output) embeddings, so rows a fine-tuning stage does not train (see
    `chatsmith.model.restrict_embedding_training`) do not shrink either. With ``cfg.freeze_planted`` the
    slices the model's config lists as frozen are kept as they are (`keep_frozen_weights`).

    Decoupled weight decay: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019).
    Betas (0.9, 0.95) as in GPT-3 / Llama pretraining.

    ``fused``: torch's fused AdamW kernel (one pass over each tensor; on the CPU about 6x faster than
    foreach for a 3.6 M parameter model: 3.5 vs 20 ms a step) when every parameter is a plain tensor on
    the CPU or a GPU (not an FSDP shard). The same update rule; the weights differ from foreach's by float
    rounding (1 ulp on a few weights a step). GRPO asks for it: its steps are short, so the optimizer shows.
    """
    embedding_ids: set[int] = set()
    for getter in (getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)):
        layer = getter() if callable(getter) else None
        if layer is not None and getattr(layer, "weight", None) is not None:
            embedding_ids.add(id(layer.weight))
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ChatsmithError("the model has no trainable parameters")
    # foreach: one call per step for all tensors (torch picks it only for CUDA); on the CPU the same
    # arithmetic as the per-tensor loop, bit for bit, with less Python per step (small models notice).
    params = [p for g in groups for p in g["params"]]
    fused = fused and all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                  **({"fused": True} if fused else {"foreach": True}))
    if fused:
        # The fused kernel writes the weights without bumping their version counters, which is how the
        # sampling engine's weight copies (`generate.decoders`) notice a change: bump them after each step.
        optimizer.register_step_post_hook(lambda opt, args, kwargs: increment_version(params))
    if cfg.freeze_planted and keep_frozen_weights(optimizer, model) == 0:
        note("--freeze-planted: the model's config lists no frozen weight slices; every weight trains")
    return optimizer


def keep_frozen_weights(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Keep the weight slices that the model's config lists as frozen (`chatsmith.planted.frozen_weight_masks`:
    the planted induction circuit) exactly as they are, whatever the optimizer does to the rest of the
    tensor: the values are taken at the first step (after any checkpoint was loaded) and written back after
    every step, which also undoes weight decay there. Works on whole tensors and on FSDP shards (each rank
    keeps its own piece). Returns the number of parameters with frozen slices."""
    entries = [(param, mask) for _, param, mask in frozen_weight_masks(model) if param.requires_grad]
    if not entries:
        return 0
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def take(opt, args, kwargs):
        if kept:
            return
        for param, mask in entries:
            local, local_mask = local_piece(param, mask)
            kept.append((param, local_mask.bool(), local.detach().clone()))

    @torch.no_grad()
    def put_back(opt, args, kwargs):
        for param, mask, values in kept:
            local = local_tensor(param)
            local.copy_(torch.where(mask, values, local))

    optimizer.register_step_pre_hook(take)
    optimizer.register_step_post_hook(put_back)
    return len(entries)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based): linear warmup, then cosine to min ratio.

    Warmup reaches 1.0 at step ``warmup_steps - 1``; the cosine (Loshchilov & Hutter, SGDR 2017) goes from
    1.0 at ``warmup_steps`` to ``min_lr_ratio`` at ``total_steps - 1`` and stays there afterwards.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Picklable lr lambda (a plain closure would make LambdaLR's state_dict depend on code identity)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``cfg.warmup_steps`` then cosine decay to ``cfg.lr * cfg.min_lr_ratio``."""
    total = int(total_steps if total_steps is not None else cfg.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(cfg.warmup_steps, total, cfg.min_lr_ratio))


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """The global norm of the parameters' gradients, clipped in place to ``max_norm`` when it is > 0.
    0.0 when no parameter has a gradient. Under FSDP the norm of sharded gradients is gathered."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm and max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    if hasattr(norm, "full_tensor"):   # FSDP: the norm of sharded gradients is a DTensor
        norm = norm.full_tensor()
    return float(norm)
