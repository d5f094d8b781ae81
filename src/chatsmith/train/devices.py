"""Where a model runs: the compute dtype, autocast and loss scaling, and the wrappers (DDP, FSDP, LossModule).

    amp = resolve_dtype("auto", "cuda")               # torch.bfloat16 on a CUDA GPU with bf16, None (fp32) on CPU
    with autocast_context("cuda", amp): ...
    precision = Precision(amp, "cuda")                # + a GradScaler when amp is torch.float16
    precision.backward(loss); precision.unscale(opt); clip...; precision.step(opt); precision.update()
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

__all__ = ["DTYPES", "resolve_dtype", "autocast_context", "Precision", "LossFn", "LossModule", "unwrap_model"]

DTYPES = ("auto", "bf16", "fp16", "fp32")   # the choices of every training command's --dtype


def cuda_supports_bf16(device: str) -> bool:
    """Whether ``device`` is a CUDA GPU that computes in bfloat16 (Ampere and newer)."""
    return str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(dtype: str, device: str) -> torch.dtype | None:
    """The autocast dtype for ``--dtype`` on ``device``, or None for plain fp32.

    - ``auto``: bf16 on a CUDA GPU that supports it, fp32 elsewhere (CPU, MPS, older GPUs);
    - ``bf16``: bf16 autocast on any device (CPU autocast supports it);
    - ``fp16``: fp16 autocast with loss scaling (`Precision`), CUDA only: CPU autocast has no fp16 matmul
      kernels worth using and fp16 needs the GradScaler, which is a CUDA feature, so elsewhere it is refused;
    - ``fp32``: no autocast.
    The weights and the optimizer state stay fp32 in every mode (autocast casts per operation).
    """
    if dtype == "auto":
        return torch.bfloat16 if cuda_supports_bf16(device) else None
    if dtype in ("fp32", "float32"):
        return None
    if dtype in ("bf16", "bfloat16"):
        return torch.bfloat16
    if dtype in ("fp16", "float16"):
        if not str(device).startswith("cuda"):
            raise ChatsmithError(f"--dtype fp16: needs a CUDA GPU (fp16 training uses loss scaling, a CUDA "
                                 f"feature), but the device is {device}; use --dtype bf16 or fp32 there")
        return torch.float16
    raise ChatsmithError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")


def autocast_context(device: str, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``'s type; a no-op for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=str(device).split(":")[0], dtype=dtype)


class Precision:
    """Autocast plus, for fp16, dynamic loss scaling (`torch.amp.GradScaler`; Micikevicius et al. 2018,
    "Mixed Precision Training"): the loss is multiplied by a scale before backward so small fp16 gradients
    do not flush to zero, the gradients are unscaled before clipping, and a step whose gradients overflowed
    is skipped (the scale halves). For bf16 and fp32 every method is the plain operation.

    The order in a step: ``backward(loss)`` per micro-batch, ``unscale(opt)`` for each optimizer, clip,
    ``step(opt)`` for each, then ``update()`` once.
    """

    def __init__(self, dtype: torch.dtype | None, device: str):
        self.dtype, self.device = dtype, str(device)
        kind = self.device.split(":")[0]
        self.scaler = torch.amp.GradScaler(kind) if dtype == torch.float16 else None

    def autocast(self):
        return autocast_context(self.device, self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale (before clipping reads them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; under loss scaling skipped when a gradient is inf/NaN."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def tolerates_overflow(self) -> bool:
        """Whether a non-finite gradient norm is an fp16 overflow the scaler skips, not a divergence."""
        return self.scaler is not None

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


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
