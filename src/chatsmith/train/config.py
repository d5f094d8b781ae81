"""The settings every training command shares (`TrainConfig`) and their checks.

Each stage subclasses `TrainConfig` and overrides defaults; its fields are the command's flags and YAML keys
(`chatsmith.config`, which also accepts the transformers/TRL names listed in `chatsmith.config.HF_ALIASES`,
e.g. `--learning-rate` for `--lr`).

    @dataclass
    class MyConfig(TrainConfig):
        data: str = arg("data.jsonl", "Training data.")
        lr: float = arg(1e-4, "Peak learning rate.")

Tests: `python -m pytest tests/test_train_loop.py -q`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from chatsmith.config import SEED_MAX, arg, validate_config
from chatsmith.errors import ChatsmithError
from chatsmith.train.devices import DTYPES
from chatsmith.train.lora import (LORA_ALPHA_HELP, LORA_DROPOUT_HELP, LORA_R_HELP, LORA_TARGETS_HELP,
                                  check_lora_settings)
from chatsmith.train.parallel import PARALLEL_MODES
from chatsmith.utils import world_size

__all__ = ["TrainConfig", "REPORT_TO", "check_epochs_or_steps", "check_room_for_prompt", "check_train_config", "steps_for_epochs"]

REPORT_TO = ("none", "tensorboard")

FREEZE_PLANTED_HELP = (
    "Keep the weight slices that the model's config.json lists under `chatsmith_frozen_weights` (the wiring of "
    "the circuits `chatsmith pretrain --init induction` plants, see chatsmith.planted) exactly as they are: "
    "they are restored after every optimizer step, so neither the gradient nor weight decay moves them. Off: "
    "every weight trains, whatever the config lists.")


@dataclass
class TrainConfig:
    """Flags every training command shares. Stages subclass this and override defaults."""

    out: str = arg("runs/train", "Output directory: final model, metrics.jsonl, checkpoint/.")
    max_steps: int = arg(200, "Number of optimizer steps.", min=1)
    seed: int = arg(0, "Random seed (model init, data order, dropout).", min=0, max=SEED_MAX)
    resume: bool = arg(False, "Continue from OUT/checkpoint if present (same data order, optimizer, RNG).")
    overwrite: bool = arg(False, "Train into a non-empty --out that is not a run of this command: chatsmith "
                          "deletes its own run files there (checkpoint/, metrics.jsonl, ...) and replaces its model "
                          "files; other files are left alone.")
    lr: float = arg(1e-3, "Peak learning rate (AdamW).", min=0, min_exclusive=True)
    warmup_steps: int = arg(20, "Linear warmup steps from 0 to --lr.", min=0)
    min_lr_ratio: float = arg(0.1, "Cosine decay ends at lr * min_lr_ratio at --max-steps.", min=0, max=1)
    batch_size: int = arg(16, "Sequences (rows) per micro-batch per process.", min=1)
    grad_accum: int = arg(1, "Micro-batches accumulated per optimizer step.", min=1)
    max_len: int = arg(256, "Maximum sequence length in tokens.", min=1)
    weight_decay: float = arg(0.1, "AdamW weight decay (not applied to norms, biases, embeddings).", min=0)
    grad_clip: float = arg(1.0, "Clip the global gradient norm to this value (0 = off).", min=0)
    eval_every: int = arg(0, "Evaluate every N steps (0 = only at the end).", min=0)
    save_every: int = arg(100, "Write OUT/checkpoint every N steps (0 = only at the end).", min=0)
    log_every: int = arg(10, "Write a metrics row every N steps.", min=1)
    report_to: str = arg("none", "Also write the metrics as TensorBoard event files in OUT/tensorboard "
                         "(`tensorboard --logdir OUT/tensorboard`; needs `pip install tensorboard`).",
                         choices=list(REPORT_TO))
    freeze_planted: bool = arg(False, FREEZE_PLANTED_HELP)
    device: str = arg("auto", "cpu, cuda, cuda:1, mps or auto.")
    dtype: str = arg("auto", "Compute dtype (autocast; weights, optimizer state and losses stay fp32): auto "
                     "(bf16 on a GPU that supports it, fp32 on CPU), bf16, fp16 (CUDA only, with loss scaling) "
                     "or fp32.", choices=list(DTYPES))
    dry_run: bool = arg(False, "Print the parameter count, trainable parameters and the estimated peak memory "
                        "per device for these settings, then exit without training or writing --out.")
    progress: bool = arg(True, "Show a progress bar (main process, interactive).")
    activation_checkpointing: bool = arg(False, "Recompute each decoder layer's activations in the backward pass "
                                         "instead of storing them: about a third more compute for a fraction "
                                         "of the activation memory (long sequences, big models).")
    parallel: str = arg("ddp", "Under torchrun: ddp (every rank holds the whole model) or fsdp (weights, "
                        "gradients and optimizer state sharded over ranks, one unit per decoder layer: for "
                        "models too big for one device). Checkpoints are interchangeable.", choices=PARALLEL_MODES)
    lora_r: int = arg(0, LORA_R_HELP, min=0)
    lora_alpha: float | None = arg(None, LORA_ALPHA_HELP, min=0, min_exclusive=True)
    lora_dropout: float = arg(0.0, LORA_DROPOUT_HELP, min=0, max=1, max_exclusive=True)
    lora_targets: str = arg("all-linear", LORA_TARGETS_HELP)

    def check_settings(self) -> None:
        """Cross-setting rules (`chatsmith.config.validate_config` calls this); stages extend it."""
        check_lora_settings(self)


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse settings no run can use, naming the flag: every field's bounds (`validate_config`), then what
    must hold once a stage has resolved ``--epochs`` into ``max_steps``."""
    validate_config(cfg)
    checks = [
        (cfg.max_steps >= 1, f"--max-steps must be >= 1, got {cfg.max_steps}"),
        (cfg.grad_accum >= 1, f"--grad-accum must be >= 1, got {cfg.grad_accum}"),
        (cfg.parallel in PARALLEL_MODES,
         f"--parallel: expected one of {', '.join(PARALLEL_MODES)}, got {cfg.parallel!r}"),
        (cfg.report_to in REPORT_TO, f"--report-to: expected one of {', '.join(REPORT_TO)}, got {cfg.report_to!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ChatsmithError(message)


def check_epochs_or_steps(cfg: TrainConfig) -> None:
    """For stages where ``--epochs`` > 0 stands for ``--max-steps``: one of them must ask for some training."""
    if cfg.max_steps < 1 and not cfg.epochs > 0:
        raise ChatsmithError(f"--max-steps: expected an integer >= 1 when --epochs is 0, got {cfg.max_steps}")


def check_room_for_prompt(cfg: Any) -> None:
    """For sampling stages: a response of ``--max-new-tokens`` must leave room for a prompt in ``--max-len``."""
    if cfg.max_new_tokens >= cfg.max_len:
        raise ChatsmithError(f"--max-new-tokens: expected an integer < --max-len ({cfg.max_len}) so that a prompt "
                             f"fits, got {cfg.max_new_tokens}")


def steps_for_epochs(n_examples: int, cfg: TrainConfig, epochs: float) -> int:
    """Optimizer steps for `epochs` passes over `n_examples` at the configured global batch
    (`batch_size x grad_accum x world size`); at least 1."""
    per_step = max(1, cfg.batch_size * cfg.grad_accum * world_size())
    return max(1, math.ceil(n_examples * epochs / per_step))
