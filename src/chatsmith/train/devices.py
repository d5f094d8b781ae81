"""Where a model runs: the compute dtype and autocast, and the wrappers (DDP, FSDP, LossModule) around it.

    amp = resolve_dtype("auto", "cuda")               # torch.bfloat16 on CUDA, None (fp32) elsewhere
    with autocast_context("cuda", amp): ...
    engine = LossModule(model, loss_fn)               # loss_fn(model, batch) as a forward, for DDP/FSDP
    plain = unwrap_model(engine)                      # the model under every wrapper

Tests: `python -m pytest tests/test_train_loop.py -q`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from chatsmith.errors import ChatsmithError

__all__ = ["resolve_dtype", "autocast_context", "LossFn", "LossModule", "unwrap_model"]


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


LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, int | torch.Tensor, dict[str, float]]"]


class LossModule(nn.Module):
    """Runs ``loss_fn(model, batch)`` as a module's forward, so DDP/FSDP wrappers see the forward pass."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any):
        return self.loss_fn(self.model, batch)


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
