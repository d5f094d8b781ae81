"""The supervised step every supervised stage shares (pretrain, SFT, reward model, DPO): `Trainer`.

How a stage uses it::

    @dataclass
    class MyConfig(TrainConfig):            # inherit the common flags, override defaults
        data: str = arg("data.jsonl", "Training data.")
        lr: float = arg(1e-4, "Peak learning rate.")

    def my_stage(cfg: MyConfig):
        set_seed(cfg.seed)                                   # model init is seeded
        model, tokenizer = ...                               # an HF model on CPU (Trainer moves it)
        items = [...]                                        # pre-tokenised examples, fixed order
        source = ShardedBatchSource(items, cfg.batch_size, collate=my_collate, seed=cfg.seed)

        def loss_fn(model, batch):                           # batch: what my_collate returned, on device
            ...
            return loss_sum, n_targets, {"acc": acc}         # SUM of per-target losses, count, extras

        def count_fn(batch) -> int:                          # n_targets, known BEFORE the forward
            return int(batch["n_targets"])

        Trainer(cfg, model, tokenizer, source, loss_fn, count_fn=count_fn,
                eval_fn=lambda m: {"eval_loss": evaluate_loss(m, eval_batches, loss_fn)},
                stage="my_stage").run()                       # -> OUT/ (HF model dir), metrics, checkpoint

The Trainer is a `chatsmith.train.run.Stage`: its `run()` hands it to a `Run`, which owns resume, logging,
evaluation, checkpoints and the final save for every stage (RL included); this module holds the maths of
one optimizer step and the loss helpers.

The contract:

- ``loss_fn(model, batch) -> (loss_sum, n_targets, metrics)``: ``loss_sum`` is a 0-d tensor, the SUM of the
  per-target losses of this micro-batch (a target = a predicted token for LMs, a pair for reward models);
  ``n_targets`` an int; ``metrics`` a dict of floats, averaged over the accumulation window and the ranks
  weighted by ``n_targets``, or of ``(sum, count)`` pairs for a mean over other units (e.g. the pairs of
  a ranking), reported as total sum / total count. Tokens/s counts ``token_count_fn(batch)`` (default: the
  size of ``input_ids``).
- The trainer draws the ``grad_accum`` micro-batches of an optimizer step first, counts their targets with
  ``count_fn`` (all-reduced across ranks), and backpropagates ``loss_sum * world_size / N_total``: the
  gradient is that of (sum of all target losses) / (number of targets in the whole accumulated batch,
  all ranks), exactly what one big batch would give, not a mean of per-micro-batch means.
  ``default_count_targets`` reads ``batch["n_targets"]``, else counts ``batch["targets"] != -100``, else
  the shifted ``batch["labels"][:, 1:] != -100``.
- The batch source must be deterministic and resumable: ``next_batch()``, ``state_dict()``,
  ``load_state_dict()`` (:class:`ShardedBatchSource` is one).
- The loss_fn runs inside ``LossModule.forward`` so that the ``DistributedDataParallel`` or FSDP wrapper
  (``--parallel``; the wrap point is :meth:`Trainer.wrap_model`, FSDP details in
  :mod:`chatsmith.train.parallel`) sees the forward pass; gradient sync is skipped on all but the last
  micro-batch of a window. Logging, progress bars and checkpoint writes happen on rank 0.

Checkpoints (`chatsmith.train.checkpoint`) live in ``OUT/checkpoint/``; ``--resume`` restores them, and on CPU
a resumed run's losses are bit-identical to an uninterrupted run's. Tests: `python -m pytest
tests/test_train_loop.py -q`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from chatsmith.errors import ChatsmithError
from chatsmith.train.batching import BatchSource, move_to_device
from chatsmith.train.config import TrainConfig
from chatsmith.train.devices import LossFn, LossModule, autocast_context, unwrap_model
from chatsmith.train.optim import build_optimizer, build_scheduler, clip_gradients
from chatsmith.train.parallel import (all_reduce_sum, enable_activation_checkpointing, full_state_dict,
                                      load_full_state_dict, mask_embedding_gradients, shard_for_training,
                                      unsharded_root)
from chatsmith.train.run import CheckpointParts, Run, Stage, TrainingDiverged, TrainResult

__all__ = ["Trainer", "default_count_targets", "default_token_count", "evaluate_loss", "lm_loss_on_targets"]


def default_count_targets(batch: Any) -> int:
    """Targets in a micro-batch: ``n_targets``, else ``targets != -100``, else shifted ``labels != -100``."""
    get = batch.get if isinstance(batch, dict) else (lambda k: getattr(batch, k, None))
    if get("n_targets") is not None:
        return int(get("n_targets"))
    if get("targets") is not None:
        return int((get("targets") != -100).sum())
    if get("labels") is not None:
        return int((get("labels")[:, 1:] != -100).sum())
    raise ChatsmithError("cannot count targets in the batch: give the Trainer a count_fn")


def default_token_count(batch: Any) -> int:
    """Tokens in a micro-batch for the tokens/s figure: the size of ``input_ids``."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else getattr(batch, "input_ids", None)
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn, device: str | None = None,
                  dtype: torch.dtype | None = None) -> float:
    """Sum of target losses / number of targets over ``batches`` (eval mode, no grad)."""
    inner = unwrap_model(model)
    device = device or str(next(inner.parameters()).device)
    was_training = inner.training
    inner.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            with autocast_context(device, dtype):
                loss_sum, n, _ = loss_fn(inner, move_to_device(batch, device))
            total += float(loss_sum)
            count += int(n)
    finally:
        inner.train(was_training)
    total, count = all_reduce_sum([total, float(count)], device)
    return total / max(1, count)


def lm_loss_on_targets(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                       position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy, with the LM head applied ONLY at positions that have a target.

    ``input_ids`` (b, t); ``targets`` (b, t) already shifted: ``targets[i, j]`` is the token to predict
    after reading ``input_ids[i, :j+1]``, -100 where there is no loss. ``position_ids`` (b, t) and a
    ``attention_mask`` (b, 1, t, t) bool (True = may attend; block-diagonal for packed rows) are passed to
    the backbone. Returns ``(loss_sum, n_targets)``.

    Why: for a tiny model the vocabulary projection dominates the FLOPs (2·h·V per position against
    ~24·h² for a whole layer at h=128, V=4096), and in SFT only the assistant tokens (often < half) need it.
    The backbone's hidden states are gathered at the target positions, (n, h), before the head, (n, V).
    Falls back to full logits for models without a separable backbone/head.
    """
    keep = targets != -100
    n_targets = int(keep.sum())
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None or _has_logit_postprocessing(model):
        logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask).logits
        logits = logits[keep]
    else:
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state
        logits = head(hidden[keep])
    loss_sum = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss_sum, n_targets


def _has_logit_postprocessing(model: nn.Module) -> bool:
    """Models whose logits are not just head(hidden) (softcapping, scaling) take the slow full path."""
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "final_logit_softcapping", None)) or bool(getattr(cfg, "logit_scale", None))


class Trainer(Stage):
    """Runs a supervised stage: see the module docstring for the loss_fn / count_fn / batch source contract.

    ``run()`` trains for ``cfg.max_steps`` optimizer steps through a `chatsmith.train.run.Run`: evaluation
    every ``cfg.eval_every`` steps and at the end, checkpoints every ``cfg.save_every`` steps and at the end,
    and finally the model as a standard HF directory in ``cfg.out`` (``extra_files`` written next to it).
    NaN/inf loss or gradient norm raises :class:`TrainingDiverged` naming the step; the last good checkpoint
    is left as it was.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, tokenizer: Any, train_source: BatchSource,
                 loss_fn: LossFn, eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                 stage: str = "train", count_fn: Callable[[Any], int] | None = None,
                 token_count_fn: Callable[[Any], int] | None = None,
                 extra_files: dict[str, str] | None = None, save_final: bool = True,
                 best_metric: str | None = None, total_steps: int | None = None):
        self.runner = Run(cfg, stage, best_metric=best_metric)   # checks cfg, joins the process group
        self.cfg, self.tokenizer, self.source, self.name = cfg, tokenizer, train_source, stage
        self.loss_fn, self.eval_fn = loss_fn, eval_fn
        self.count_fn = count_fn or default_count_targets
        self.token_count_fn = token_count_fn or default_token_count
        self.extra_files, self.save_final = extra_files, save_final
        self.device, self.amp_dtype = self.runner.device, self.runner.amp_dtype
        self.precision = self.runner.precision
        self.fsdp = cfg.parallel == "fsdp" and self.runner.distributed and torch.distributed.get_world_size() > 1
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.model = model if self.fsdp else model.to(self.device)   # FSDP moves each rank's shard itself
        self.engine = self.wrap_model(LossModule(self.model, loss_fn))
        self.optimizer = build_optimizer(self.model, cfg)      # after wrapping: FSDP replaces the parameters
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)
        self.step = 0

    def run(self) -> TrainResult:
        return self.runner.train(self)

    # -- distributed hooks -------------------------------------------------------------------------
    def wrap_model(self, module: LossModule) -> nn.Module:
        """The DDP / FSDP wrap point. Single process: the module itself."""
        if self.fsdp:
            return shard_for_training(module, module.model, self.device, compute_dtype=self.amp_dtype)
        if self.runner.distributed and torch.distributed.get_world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(self.device).index] if str(self.device).startswith("cuda") else None
            return DistributedDataParallel(module, device_ids=ids)
        return module

    def gradient_sync(self, last: bool):
        """Reduce gradients only on the last micro-batch of an accumulation window."""
        if self.fsdp:
            self.engine.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if last or not hasattr(self.engine, "no_sync"):
            return contextlib.nullcontext()
        return self.engine.no_sync()

    def unsharded_model(self) -> nn.Module:
        """The model as a plain module, for work after ``run()`` that calls it directly (e.g. the reward
        model's normalisation). Under FSDP a new copy, built from the config and given the gathered weights
        (every rank must call it); otherwise ``self.model`` itself."""
        if not self.fsdp:
            return self.model
        weights = full_state_dict(self.model)
        plain = type(self.model)(self.model.config)
        load_full_state_dict(plain, weights, source=f"the {self.name} model")
        return plain.to(device=self.device, dtype=next(iter(weights.values())).dtype)

    # -- the Stage hooks ---------------------------------------------------------------------------
    def checkpoint_parts(self) -> CheckpointParts:
        return CheckpointParts(self.model, self.optimizer, self.scheduler, self.source, self.tokenizer)

    def final_weights(self) -> dict | None:
        return full_state_dict(self.model) if self.fsdp else None   # collective under FSDP

    def evaluate(self) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast_context(self.device, self.amp_dtype), unsharded_root(self.engine):
                return self.eval_fn(self.model) or {}
        finally:
            self.model.train(was_training)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics."""
        cfg = self.cfg
        self.model.train()
        micro = [self.source.next_batch() for _ in range(cfg.grad_accum)]
        counts = [int(self.count_fn(b)) for b in micro]
        tokens = sum(int(self.token_count_fn(b)) for b in micro)
        n_total, tokens_total = all_reduce_sum([float(sum(counts)), float(tokens)], self.device)
        n_total = int(n_total)
        # DDP averages gradients over ranks; multiplying by world_size turns that average into a sum, so the
        # gradient is d(sum of all targets' losses)/d(theta) / n_total over the whole global batch.
        scale = (torch.distributed.get_world_size() if self.runner.distributed else 1) / max(1, n_total)
        loss_total = 0.0
        metric_sums: dict[str, float] = {}
        metric_counts: dict[str, float] = {}
        for i, batch in enumerate(micro):
            batch = move_to_device(batch, self.device)
            with self.gradient_sync(last=i == len(micro) - 1):
                with autocast_context(self.device, self.amp_dtype):
                    loss_sum, n, metrics = self.engine(batch)
                if int(n) != counts[i]:
                    raise ChatsmithError(f"{self.name}: loss_fn counted {int(n)} targets but count_fn said "
                                         f"{counts[i]} (they must agree for the loss normalisation)")
                self.precision.backward(loss_sum.float() * scale)
            loss_total += float(loss_sum.detach())
            for k, v in (metrics or {}).items():
                total, weight = (float(v[0]), float(v[1])) if isinstance(v, tuple) else (float(v) * counts[i],
                                                                                        counts[i])
                metric_sums[k] = metric_sums.get(k, 0.0) + total
                metric_counts[k] = metric_counts.get(k, 0.0) + weight
        if self.fsdp:
            mask_embedding_gradients(self.model)
        # The loss and the loss_fn's metrics over the whole global batch (all ranks), in one all-reduce.
        names = sorted(k for k in metric_sums if k != "tokens")
        loss_total, *sums = all_reduce_sum([loss_total] + [metric_sums[k] for k in names]
                                           + [metric_counts[k] for k in names], self.device)
        loss = loss_total / max(1, n_total)
        if not math.isfinite(loss):
            raise TrainingDiverged(self.diverged_message("loss", loss))
        self.precision.unscale(self.optimizer)
        grad_norm = clip_gradients(self.model.parameters(), cfg.grad_clip)
        if not math.isfinite(grad_norm) and not self.precision.tolerates_overflow():
            raise TrainingDiverged(self.diverged_message("gradient norm", grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        if n_total > 0:
            self.precision.step(self.optimizer)   # fp16: skipped when the scaled gradients overflowed
        self.precision.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        out = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "n_targets": n_total, "tokens": int(tokens_total)}
        out.update({k: total / weight for k, total, weight in zip(names, sums, sums[len(names):]) if weight > 0})
        return out

    def diverged_message(self, what: str, value: float) -> str:
        checkpointer = self.runner.checkpointer
        saved = checkpointer.step()
        where = (f"the last good checkpoint ({checkpointer.path}, step {saved}) is untouched; resume from it "
                 f"with a lower --lr or more --warmup-steps" if saved is not None else
                 "no checkpoint was written yet; try a lower --lr or more --warmup-steps")
        return f"{self.name}: {what} became {value} at step {self.step + 1}; stopping. {where}"
