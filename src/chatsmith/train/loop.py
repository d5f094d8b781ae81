"""The training loop every supervised stage shares (pretrain, SFT, reward model, DPO, ...).

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

Checkpoints live in ``OUT/checkpoint/`` (weights as safetensors + optimizer, scheduler, RNG states, step and
the data position), written through :func:`chatsmith.utils.atomic_directory`, so an interrupted write leaves
the previous checkpoint intact. ``--resume`` restores all of it; on CPU a resumed run's losses are
bit-identical to an uninterrupted run's (tests/test_train_loop.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from chatsmith.config import arg, save_config
from chatsmith.errors import ChatsmithError
from chatsmith.train.parallel import (PARALLEL_MODES, enable_activation_checkpointing, full_optimizer_state,
                                      full_state_dict, load_full_state_dict, load_optimizer_state,
                                      mask_embedding_gradients, save_weights, shard_for_training, unsharded_root)
from chatsmith.utils import (MetricsLogger, atomic_directory, atomic_write_text, init_distributed, is_main_process,
                             process_group_ready, rank, recover_directory, resolve_device, set_seed, world_size)

__all__ = [
    "TrainConfig", "steps_for_epochs", "build_optimizer", "build_scheduler", "lr_multiplier", "Checkpointer", "BatchSource",
    "ShardedBatchSource", "Progress", "MetricsLogger", "Trainer", "TrainResult", "LossModule",
    "TrainingDiverged", "default_count_targets", "evaluate_loss", "move_to_device", "autocast_context",
    "resolve_dtype", "unwrap_model", "lm_loss_on_targets", "save_final_model", "all_reduce_sum",
    "sum_over_ranks", "all_reduce_gradients",
]


# ----------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    """Flags every training command shares. Stages subclass this and override defaults."""

    out: str = arg("runs/train", "Output directory: final model, metrics.jsonl, checkpoint/.")
    max_steps: int = arg(200, "Number of optimizer steps.")
    seed: int = arg(0, "Random seed (model init, data order, dropout).")
    resume: bool = arg(False, "Continue from OUT/checkpoint if present (same data order, optimizer, RNG).")
    lr: float = arg(1e-3, "Peak learning rate (AdamW).")
    warmup_steps: int = arg(20, "Linear warmup steps from 0 to --lr.")
    min_lr_ratio: float = arg(0.1, "Cosine decay ends at lr * min_lr_ratio at --max-steps.")
    batch_size: int = arg(16, "Sequences (rows) per micro-batch per process.")
    grad_accum: int = arg(1, "Micro-batches accumulated per optimizer step.")
    max_len: int = arg(256, "Maximum sequence length in tokens.")
    weight_decay: float = arg(0.1, "AdamW weight decay (not applied to norms, biases, embeddings).")
    grad_clip: float = arg(1.0, "Clip the global gradient norm to this value (0 = off).")
    eval_every: int = arg(0, "Evaluate every N steps (0 = only at the end).")
    save_every: int = arg(100, "Write OUT/checkpoint every N steps (0 = only at the end).")
    log_every: int = arg(10, "Write a metrics row every N steps.")
    device: str = arg("auto", "cpu, cuda, cuda:1, mps or auto.")
    dtype: str = arg("auto", "Compute dtype: auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16.",
                     choices=["auto", "fp32", "bf16"])
    progress: bool = arg(True, "Show a progress bar (main process, interactive).")
    activation_checkpointing: bool = arg(False, "Recompute each decoder layer's activations in the backward pass "
                                         "instead of storing them: about a third more compute for a fraction "
                                         "of the activation memory (long sequences, big models).")
    parallel: str = arg("ddp", "Under torchrun: ddp (every rank holds the whole model) or fsdp (weights, "
                        "gradients and optimizer state sharded over ranks, one unit per decoder layer: for "
                        "models too big for one device). Checkpoints are interchangeable.", choices=PARALLEL_MODES)


def steps_for_epochs(n_examples: int, cfg: TrainConfig, epochs: float) -> int:
    """Optimizer steps for `epochs` passes over `n_examples` at the configured global batch
    (`batch_size x grad_accum x world size`); at least 1."""
    per_step = max(1, cfg.batch_size * cfg.grad_accum * world_size())
    return max(1, math.ceil(n_examples * epochs / per_step))


# ----------------------------------------------------------------------------- optimizer / schedule

def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with two parameter groups: weight decay on matrices, none on norms, biases and the
    (input and output) embeddings, so rows a fine-tuning stage does not train (see
    `chatsmith.model.restrict_embedding_training`) do not shrink either.

    Decoupled weight decay: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019).
    Betas (0.9, 0.95) as in GPT-3 / Llama pretraining.
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
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    keep_frozen_weights(optimizer, model)
    return optimizer


def keep_frozen_weights(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Keep the weight slices that the model's config lists as frozen (`chatsmith.model.frozen_weight_masks`:
    the planted induction circuit) exactly as they are, whatever the optimizer does to the rest of the
    tensor: the values are taken at the first step (after any checkpoint was loaded) and written back after
    every step, which also undoes weight decay there. Works on whole tensors and on FSDP shards (each rank
    keeps its own piece). Returns the number of parameters with frozen slices."""
    from chatsmith.model import frozen_weight_masks
    from chatsmith.train.parallel import local_piece, local_tensor

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


class _Schedule:
    """Picklable lr lambda (a plain closure would make LambdaLR's state_dict depend on code identity)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``cfg.warmup_steps`` then cosine decay to ``cfg.lr * cfg.min_lr_ratio``."""
    total = int(total_steps if total_steps is not None else cfg.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(cfg.warmup_steps, total, cfg.min_lr_ratio))


# ----------------------------------------------------------------------------- devices / dtypes

def resolve_dtype(dtype: str, device: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. 'auto' = bf16 autocast on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else None
    if dtype in ("fp32", "float32"):
        return None
    if dtype in ("bf16", "bfloat16"):
        return torch.bfloat16
    raise ChatsmithError(f"--dtype: expected auto, fp32 or bf16, got {dtype!r}")


def autocast_context(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=str(device).split(":")[0], dtype=dtype)


def move_to_device(batch: Any, device: str | torch.device) -> Any:
    """Move tensors inside dicts, lists, tuples and dataclasses to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: move_to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP/FSDP/LossModule/torch.compile wrappers."""
    while True:
        if isinstance(model, LossModule):
            model = model.model
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _distributed() -> bool:
    return process_group_ready()


def all_reduce_sum(values: list[float], device: Any) -> list[float]:
    """Each value summed over ranks (one float64 all-reduce); the values themselves in one process."""
    if not _distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A tensor summed over ranks (a new tensor; the tensor itself in one process)."""
    if not _distributed():
        return t
    t = t.clone()
    torch.distributed.all_reduce(t)
    return t


def all_reduce_gradients(params: Iterable[nn.Parameter], average: bool) -> None:
    """Sum (or average) the parameters' gradients over ranks in place, with one all-reduce of a flat buffer.

    For the RL loops, which do their own accumulation instead of wrapping the model in DDP: `average` when
    each rank's loss is already a mean over an equal share of the batch (GRPO), a plain sum when each rank
    weighted its loss by its share of the global token count (PPO)."""
    if not _distributed():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:   # every rank must contribute a buffer of the same layout
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    if average:
        flat /= torch.distributed.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# ----------------------------------------------------------------------------- data

class BatchSource(Protocol):
    """What the Trainer needs from a data source."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShardedBatchSource:
    """An endless, deterministic, resumable, rank-sharded stream of batches over a fixed list of items.

    Epoch ``e`` visits the items in the order ``numpy.random.default_rng([seed, e]).permutation(n)`` (or in
    the given order with ``shuffle=False``). Under torchrun the order is padded by wrapping around to a
    multiple of the world size (as ``torch.utils.data.DistributedSampler`` does), and rank ``r`` takes
    positions ``r, r + W, r + 2W, ...``, so every rank has the same number of batches and the ranks' batches
    ``k`` together are positions ``k·b·W`` to ``(k+1)·b·W - 1`` whatever ``W`` (up to the wrap-around
    padding of the last batch of an epoch). The state is
    ``(epoch, batch index in the epoch)``: ``state_dict()`` after ``k`` batches and ``load_state_dict`` on a
    fresh source continue with batch ``k + 1`` exactly.
    """

    def __init__(self, items: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Any],
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None):
        if len(items) == 0:
            raise ChatsmithError("no training examples left after preprocessing (empty data?)")
        if batch_size < 1:
            raise ChatsmithError(f"--batch-size must be >= 1, got {batch_size}")
        self.items, self.batch_size, self.collate = items, int(batch_size), collate
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        self.rank = _rank() if rank is None else int(rank)
        self.world_size = _world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ChatsmithError(f"rank {self.rank} is outside world size {self.world_size}")
        self.epoch, self.position = 0, 0
        self._order: list[int] | None = None
        if self.batches_per_epoch == 0:
            raise ChatsmithError(f"{len(items)} examples cannot fill one batch of {batch_size} per process "
                                 f"with drop_last (world size {self.world_size})")

    @property
    def shard_size(self) -> int:
        return math.ceil(len(self.items) / self.world_size)

    @property
    def batches_per_epoch(self) -> int:
        n = self.shard_size
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def shard_indices(self, epoch: int) -> list[int]:
        """Indices of the items this rank visits in ``epoch``, in order."""
        n = len(self.items)
        order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n))
        total = self.shard_size * self.world_size
        order = np.concatenate([order, order[: total - n]]) if total > n else order
        return order[self.rank::self.world_size].tolist()

    def next_indices(self) -> list[int]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.shard_indices(self.epoch)
        start = self.position * self.batch_size
        self.position += 1
        return self._order[start:start + self.batch_size]

    def next_batch(self) -> Any:
        return self.collate([self.items[i] for i in self.next_indices()])

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_items": len(self.items),
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved batch. The number of processes may change if the global batch (batch size
        x world size) does not: global batch ``k`` is always the slice ``k·B : (k+1)·B`` of the epoch's order."""
        for key, mine in (("n_items", len(self.items)), ("seed", self.seed)):
            if key in state and int(state[key]) != mine:
                raise ChatsmithError(f"cannot resume: the checkpoint's data has {key}={state[key]}, this run has "
                                     f"{mine} (resume with the same data and settings)")
        if "batch_size" in state:
            saved = int(state["batch_size"]) * int(state.get("world_size", 1))
            mine = self.batch_size * self.world_size
            if saved != mine:
                raise ChatsmithError(
                    f"cannot resume: the checkpoint's global batch is {saved} rows (--batch-size "
                    f"{state['batch_size']} x {state.get('world_size', 1)} processes), this run's is {mine} "
                    f"(--batch-size {self.batch_size} x {self.world_size}); keep batch size x processes the same")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def _rank() -> int:
    return rank()


def _world_size() -> int:
    return world_size()


# ----------------------------------------------------------------------------- checkpoints

def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        # Python and NumPy states as plain ints/lists so torch.load(weights_only=True) can read them.
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # a different GPU count: keep the fresh CUDA seeds
            torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Atomic save/load of everything needed to resume, in ``OUT/checkpoint/`` (only the latest is kept).

    Layout: ``model.safetensors`` (weights; tied weights stored once), ``state.pt`` (optimizer, scheduler,
    RNG states, data position, step, extra; readable with ``torch.load(weights_only=True)``),
    ``trainer_state.json`` (step and a few numbers for humans), optional ``tokenizer/``.
    ``save_best`` writes the weights alone to ``OUT/checkpoint-best/`` when a metric improves.
    """

    def __init__(self, out: str | Path, name: str = "checkpoint"):
        self.out = Path(out)
        self.path = self.out / name
        self.best_path = self.out / f"{name}-best"
        recover_directory(self.path)
        recover_directory(self.best_path)

    def exists(self) -> bool:
        return (self.path / "state.pt").is_file() and (self.path / "model.safetensors").is_file()

    def step(self) -> int | None:
        if not self.exists():
            return None
        with contextlib.suppress(Exception):
            return int(json.loads((self.path / "trainer_state.json").read_text())["step"])
        return None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any = None, data_state: dict[str, Any] | None = None, tokenizer: Any = None,
             extra: dict[str, Any] | None = None, info: dict[str, Any] | None = None) -> Path | None:
        """Write a complete checkpoint or nothing (rank 0 writes, other ranks return None). Every rank must
        call it: FSDP shards are gathered into whole tensors first, so the files are the same however the
        run was parallelised."""
        weights = full_state_dict(unwrap_model(model))
        optimizer_state = full_optimizer_state(optimizer) if optimizer is not None else None
        if not is_main_process():
            return None
        state = {
            "step": int(step),
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": _rng_state(),
            "data": data_state,
            "extra": extra or {},
        }
        with atomic_directory(self.path) as tmp:
            save_weights(weights, str(tmp / "model.safetensors"))
            torch.save(state, tmp / "state.pt")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
            atomic_write_text(tmp / "trainer_state.json",
                              json.dumps({"step": int(step), **(info or {})}, indent=1) + "\n")
        return self.path

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
             data_source: Any = None, restore_rng: bool = True) -> dict[str, Any]:
        """Restore into the given objects; returns the state dict (``step``, ``extra``, ...)."""
        if not self.exists():
            raise ChatsmithError(f"no checkpoint in {self.path}")
        from safetensors.torch import load_file

        weights_file = self.path / "model.safetensors"
        load_full_state_dict(unwrap_model(model), load_file(str(weights_file)), source=str(weights_file))
        state = torch.load(self.path / "state.pt", map_location="cpu", weights_only=True)
        if optimizer is not None and state.get("optimizer") is not None:
            load_optimizer_state(optimizer, state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if data_source is not None and state.get("data") is not None:
            data_source.load_state_dict(state["data"])
        if restore_rng:
            _set_rng_state(state["rng"])
        return state

    def save_best(self, model: nn.Module, step: int, metric: str, value: float) -> Path | None:
        weights = full_state_dict(unwrap_model(model))   # collective under FSDP
        if not is_main_process():
            return None
        with atomic_directory(self.best_path) as tmp:
            save_weights(weights, str(tmp / "model.safetensors"))
            atomic_write_text(tmp / "trainer_state.json",
                              json.dumps({"step": int(step), metric: value}, indent=1) + "\n")
        return self.best_path


# ----------------------------------------------------------------------------- progress

class Progress:
    """A tqdm bar on the main process showing loss, tokens/s and (from tqdm) the ETA."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
        self.bar = None
        self.tokens = 0
        self.start = time.perf_counter()
        if enabled and is_main_process():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5)

    def update(self, n_steps: int, tokens: int, **postfix: float) -> float:
        """Advance; returns tokens/s since the bar started."""
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.start)
        if self.bar is not None:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
            shown["tok/s"] = f"{rate:,.0f}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n_steps)
        return rate

    def write(self, message: str) -> None:
        if not is_main_process():
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- trainer

class TrainingDiverged(ChatsmithError):
    """The loss or the gradient norm became NaN/inf."""


LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, int | torch.Tensor, dict[str, float]]"]


class LossModule(nn.Module):
    """Runs ``loss_fn(model, batch)`` as a module's forward, so DDP/FSDP wrappers see the forward pass."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any):
        return self.loss_fn(self.model, batch)


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


def _default_token_count(batch: Any) -> int:
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


@dataclass
class TrainResult:
    out: Path
    step: int
    loss: float | None          # the last optimizer step's loss
    eval: dict[str, float]      # the last evaluation
    resumed_from: int | None


class Trainer:
    """Runs a supervised stage: see the module docstring for the loss_fn / count_fn / batch source contract.

    ``run()`` trains for ``cfg.max_steps`` optimizer steps, evaluates every ``cfg.eval_every`` steps and at
    the end, checkpoints every ``cfg.save_every`` steps and at the end, and finally saves the model as a
    standard HF directory in ``cfg.out`` through ``chatsmith.model.save_model`` (``extra_files`` are written
    next to it). NaN/inf loss or gradient norm raises :class:`TrainingDiverged` naming the step; the last
    good checkpoint is left as it was.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, tokenizer: Any, train_source: BatchSource,
                 loss_fn: LossFn, eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                 stage: str = "train", count_fn: Callable[[Any], int] | None = None,
                 token_count_fn: Callable[[Any], int] | None = None,
                 extra_files: dict[str, str] | None = None, save_final: bool = True,
                 best_metric: str | None = None, total_steps: int | None = None):
        if cfg.max_steps < 1:
            raise ChatsmithError(f"--max-steps must be >= 1, got {cfg.max_steps}")
        if cfg.grad_accum < 1:
            raise ChatsmithError(f"--grad-accum must be >= 1, got {cfg.grad_accum}")
        self.cfg, self.tokenizer, self.source, self.stage = cfg, tokenizer, train_source, stage
        self.loss_fn, self.eval_fn = loss_fn, eval_fn
        self.count_fn = count_fn or default_count_targets
        self.token_count_fn = token_count_fn or _default_token_count
        self.extra_files, self.save_final, self.best_metric = extra_files, save_final, best_metric
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        init_distributed(self.device)   # under torchrun: join the process group before DDP wraps the model
        self.amp_dtype = resolve_dtype(cfg.dtype, self.device)
        if cfg.parallel not in PARALLEL_MODES:
            raise ChatsmithError(f"--parallel: expected one of {', '.join(PARALLEL_MODES)}, got {cfg.parallel!r}")
        self.fsdp = cfg.parallel == "fsdp" and _distributed() and torch.distributed.get_world_size() > 1
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.model = model if self.fsdp else model.to(self.device)   # FSDP moves each rank's shard itself
        self.engine = self.wrap_model(LossModule(self.model, loss_fn))
        self.optimizer = build_optimizer(self.model, cfg)      # after wrapping: FSDP replaces the parameters
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)
        self.checkpointer = Checkpointer(self.out)
        self.logger = MetricsLogger(self.out, stage=stage)
        self.step = 0
        self.best_value: float | None = None

    # -- distributed hooks -------------------------------------------------------------------------
    def wrap_model(self, module: LossModule) -> nn.Module:
        """The DDP / FSDP wrap point. Single process: the module itself."""
        if self.fsdp:
            return shard_for_training(module, module.model, self.device, compute_dtype=self.amp_dtype)
        if _distributed() and torch.distributed.get_world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(self.device).index] if str(self.device).startswith("cuda") else None
            return DistributedDataParallel(module, device_ids=ids)
        return module

    def _no_sync(self, last: bool):
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
        load_full_state_dict(plain, weights, source=f"the {self.stage} model")
        return plain.to(device=self.device, dtype=next(iter(weights.values())).dtype)

    # -- main loop ---------------------------------------------------------------------------------
    def _prepare_out(self) -> int | None:
        """Resume if asked and possible; returns the step resumed from."""
        cfg = self.cfg
        if cfg.resume and self.checkpointer.exists():
            state = self.checkpointer.load(self.model, self.optimizer, self.scheduler, self.source)
            self.step = int(state["step"])
            self.best_value = state.get("extra", {}).get("best_value")
            self.logger.truncate_after(self.step)
            if self.step >= cfg.max_steps:
                _note(f"{self.checkpointer.path} is already at step {self.step} >= --max-steps {cfg.max_steps}")
            else:
                _note(f"resuming {self.stage} from {self.checkpointer.path} at step {self.step}")
            return self.step
        if cfg.resume:
            _note(f"--resume: no checkpoint in {self.checkpointer.path}, starting from step 0")
        elif self.checkpointer.exists():
            _note(f"{self.checkpointer.path} exists (step {self.checkpointer.step()}); starting over "
                  f"(pass --resume to continue it)")
        if is_main_process() and self.logger.path.exists():
            self.logger.path.unlink()
        return None

    def _save_checkpoint(self, last_loss: float | None) -> None:
        self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler, self.source.state_dict(),
                               tokenizer=self.tokenizer, extra={"best_value": self.best_value},
                               info={"stage": self.stage, "loss": last_loss, "max_steps": self.cfg.max_steps})

    def _evaluate(self) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast_context(self.device, self.amp_dtype), unsharded_root(self.engine):
                result = self.eval_fn(self.model) or {}
        finally:
            self.model.train(was_training)
        result = {(k if k.startswith("eval") else f"eval_{k}"): float(v) for k, v in result.items()}
        if result:
            self.logger.log(self.step, **result)
        if self.best_metric and self.best_metric in result:
            value = result[self.best_metric]
            if self.best_value is None or value < self.best_value:
                self.best_value = value
                self.checkpointer.save_best(self.model, self.step, self.best_metric, value)
        return result

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics."""
        cfg = self.cfg
        micro = [self.source.next_batch() for _ in range(cfg.grad_accum)]
        counts = [int(self.count_fn(b)) for b in micro]
        tokens = sum(int(self.token_count_fn(b)) for b in micro)
        n_total, tokens_total = all_reduce_sum([float(sum(counts)), float(tokens)], self.device)
        n_total = int(n_total)
        # DDP averages gradients over ranks; multiplying by world_size turns that average into a sum, so the
        # gradient is d(sum of all targets' losses)/d(theta) / n_total over the whole global batch.
        scale = (torch.distributed.get_world_size() if _distributed() else 1) / max(1, n_total)
        loss_total = 0.0
        metric_sums: dict[str, float] = {}
        metric_counts: dict[str, float] = {}
        for i, batch in enumerate(micro):
            batch = move_to_device(batch, self.device)
            with self._no_sync(last=i == len(micro) - 1):
                with autocast_context(self.device, self.amp_dtype):
                    loss_sum, n, metrics = self.engine(batch)
                if int(n) != counts[i]:
                    raise ChatsmithError(f"{self.stage}: loss_fn counted {int(n)} targets but count_fn said "
                                         f"{counts[i]} (they must agree for the loss normalisation)")
                (loss_sum.float() * scale).backward()
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
            raise TrainingDiverged(self._diverged_message("loss", loss))
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(self._diverged_message("gradient norm", grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        if n_total > 0:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        out = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "n_targets": n_total, "tokens": int(tokens_total)}
        out.update({k: total / weight for k, total, weight in zip(names, sums, sums[len(names):]) if weight > 0})
        return out

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if self.cfg.grad_clip and self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        if hasattr(norm, "full_tensor"):   # FSDP: the norm of sharded gradients is a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def _diverged_message(self, what: str, value: float) -> str:
        saved = self.checkpointer.step()
        where = (f"the last good checkpoint ({self.checkpointer.path}, step {saved}) is untouched; resume from it "
                 f"with a lower --lr or more --warmup-steps" if saved is not None else
                 "no checkpoint was written yet; try a lower --lr or more --warmup-steps")
        return f"{self.stage}: {what} became {value} at step {self.step + 1}; stopping. {where}"

    def run(self) -> TrainResult:
        cfg = self.cfg
        resumed_from = self._prepare_out()
        if is_main_process():
            save_config(cfg, self.out / "train_config.yaml")
        self.model.train()
        progress = Progress(cfg.max_steps, initial=self.step, desc=self.stage,
                            enabled=cfg.progress and sys.stderr.isatty())
        last: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        window_start, window_tokens = time.perf_counter(), 0
        try:
            while self.step < cfg.max_steps:
                last = self.train_step()
                window_tokens += last["tokens"]
                rate = progress.update(1, last["tokens"], loss=last["loss"], lr=last["lr"])
                if self.step % max(1, cfg.log_every) == 0 or self.step == cfg.max_steps:
                    elapsed = max(1e-9, time.perf_counter() - window_start)
                    self.logger.log(self.step, **{**last, "tokens_per_s": window_tokens / elapsed})
                    window_start, window_tokens = time.perf_counter(), 0
                    if progress.bar is None and is_main_process() and cfg.progress:
                        _note(f"{self.stage} step {self.step}/{cfg.max_steps} loss {last['loss']:.4f} "
                              f"lr {last['lr']:.2e} {rate:,.0f} tok/s")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    last_eval = self._evaluate()
                    if last_eval:
                        progress.write(f"{self.stage} step {self.step}: " + ", ".join(
                            f"{k} {v:.4f}" for k, v in last_eval.items()))
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self._save_checkpoint(last.get("loss"))
        finally:
            progress.close()
        last_eval = self._evaluate() or last_eval
        if resumed_from is None or self.step > resumed_from:
            self._save_checkpoint(last.get("loss"))
        if self.save_final:
            weights = full_state_dict(self.model) if self.fsdp else None   # collective under FSDP
            if is_main_process():
                save_final_model(self.model, self.tokenizer, self.out, self.extra_files, state_dict=weights)
        if _distributed():
            torch.distributed.barrier()
        return TrainResult(self.out, self.step, last.get("loss"), last_eval, resumed_from)


def save_final_model(model: nn.Module, tokenizer: Any, out: Path, extra_files: dict[str, str] | None,
                     state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save as a standard HF directory in ``out``, keeping what else lives there (metrics.jsonl, checkpoint/).

    ``chatsmith.model.save_model`` replaces its target directory as a whole, so it writes a sibling
    directory first and the files are then moved into ``out`` one by one (each move is an atomic rename on
    the same filesystem; an interrupted move leaves the resumable checkpoint untouched).
    """
    import shutil

    from chatsmith.model import save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.final")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_model(unwrap_model(model), tokenizer, staging, extra_files=extra_files, state_dict=state_dict)
        for item in sorted(staging.rglob("*")):
            if item.is_file():
                target = out / item.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _note(message: str) -> None:
    if is_main_process():
        print(message, file=sys.stderr, flush=True)
