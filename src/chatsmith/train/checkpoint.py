"""Checkpoints: everything a run needs to resume (weights, optimizer, scheduler, RNG, data position, step),
written atomically, and the final save of a model next to the run's files.

    ckpt = Checkpointer("runs/sft")                  # runs/sft/checkpoint/
    ckpt.save(step, model, optimizer, scheduler, source.state_dict())
    state = ckpt.load(model, optimizer, scheduler, source)   # also restores the RNG states
    save_final_model(model, tokenizer, "runs/sft", extra_files=None)

On CPU a resumed run's losses are bit-identical to an uninterrupted run's (tests/test_train_loop.py).
Tests: `python -m pytest tests/test_train_loop.py -q`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chatsmith.errors import ChatsmithError
from chatsmith.model import save_model
from chatsmith.train.devices import unwrap_model
from chatsmith.train.lora import has_lora, load_trainable_state, trainable_state
from chatsmith.train.parallel import (full_optimizer_state, full_state_dict, load_full_state_dict,
                                      load_optimizer_state, save_weights)
from chatsmith.utils import atomic_directory, atomic_write_text, is_disk_full, is_main_process, recover_directory

__all__ = ["Checkpointer", "rng_state", "set_rng_state", "save_final_model"]

FINAL_STAGING = ".final-tmp"     # inside OUT: a run never writes outside its --out


def rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) random states, in a form ``torch.load(weights_only=True)`` reads."""
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


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` took, so a resumed run draws the same dropout masks and samples."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # a different GPU count: keep the fresh CUDA seeds
            torch.cuda.set_rng_state_all(state["cuda"])


def torch_save_or_enospc(obj: Any, path: Path) -> None:
    """``torch.save``; on a full disk its writer says only "unexpected pos N vs M", so a failure with (almost)
    no space left is reported as the OSError it is."""
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        if shutil.disk_usage(path.parent).free < (16 << 20):
            raise OSError(errno.ENOSPC, f"No space left on device ({exc})") from exc
        raise


def checkpoint_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: the whole state (gathered under FSDP), or with LoRA only the trainable
    adapters and heads (the frozen base is the model the run started from)."""
    inner = unwrap_model(model)
    weights = full_state_dict(inner)
    return trainable_state(inner, weights) if has_lora(inner) else weights


class Checkpointer:
    """Atomic save/load of everything needed to resume, in ``OUT/checkpoint/`` (only the latest is kept).

    Layout: ``model.safetensors`` (weights; tied weights stored once; with LoRA the adapters and heads only),
    ``state.pt`` (optimizer, scheduler, RNG states, data position, step, extra; readable with
    ``torch.load(weights_only=True)``),
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
        weights = checkpoint_weights(model)
        optimizer_state = full_optimizer_state(optimizer) if optimizer is not None else None
        if not is_main_process():
            return None
        state = {
            "step": int(step),
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "data": data_state,
            "extra": extra or {},
        }
        try:
            with atomic_directory(self.path) as tmp:
                save_weights(weights, str(tmp / "model.safetensors"))
                torch_save_or_enospc(state, tmp / "state.pt")
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp / "tokenizer"))
                atomic_write_text(tmp / "trainer_state.json",
                                  json.dumps({"step": int(step), **(info or {})}, indent=1) + "\n")
        except Exception as exc:  # safetensors raises its own SafetensorError for a full disk
            if not is_disk_full(exc):
                raise
            previous = self.step()
            kept = (f"the previous checkpoint (step {previous}) in {self.path} is intact: free some space and run "
                    f"the same command with --resume" if previous is not None else
                    "no earlier checkpoint exists: free some space and run the command again")
            raise ChatsmithError(f"disk full while writing the checkpoint of step {step} in {self.out}; "
                                 f"{kept}") from exc
        return self.path

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
             data_source: Any = None, restore_rng: bool = True) -> dict[str, Any]:
        """Restore into the given objects; returns the state dict (``step``, ``extra``, ...)."""
        if not self.exists():
            raise ChatsmithError(f"no checkpoint in {self.path}")
        from safetensors.torch import load_file

        weights_file, state_file = self.path / "model.safetensors", self.path / "state.pt"
        with self.readable(weights_file):
            weights = load_file(str(weights_file))
        inner = unwrap_model(model)
        if has_lora(inner):
            load_trainable_state(inner, weights, source=str(weights_file))
        else:
            load_full_state_dict(inner, weights, source=str(weights_file))
        with self.readable(state_file):
            state = torch.load(state_file, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "step" not in state or "rng" not in state:
                raise ValueError("not a chatsmith training state")
        if optimizer is not None and state.get("optimizer") is not None:
            load_optimizer_state(optimizer, state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if data_source is not None and state.get("data") is not None:
            data_source.load_state_dict(state["data"])
        if restore_rng:
            set_rng_state(state["rng"])
        return state

    @contextlib.contextmanager
    def readable(self, path: Path):
        """Turn a failure to read a checkpoint file (truncated, corrupt) into one clear message."""
        try:
            yield
        except Exception as exc:  # torch.load and safetensors raise many types for a damaged file
            if isinstance(exc, ChatsmithError):
                raise
            raise ChatsmithError(f"--resume: {path} is damaged or truncated ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); to start over, run the "
                                 f"same command with --overwrite instead of --resume") from exc

    def save_best(self, model: nn.Module, step: int, metric: str, value: float) -> Path | None:
        weights = checkpoint_weights(model)   # collective under FSDP
        if not is_main_process():
            return None
        with atomic_directory(self.best_path) as tmp:
            save_weights(weights, str(tmp / "model.safetensors"))
            atomic_write_text(tmp / "trainer_state.json",
                              json.dumps({"step": int(step), metric: value}, indent=1) + "\n")
        return self.best_path


def save_final_model(model: nn.Module, tokenizer: Any, out: Path, extra_files: dict[str, str] | None,
                     state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save as a standard HF directory in ``out``, keeping what else lives there (metrics.jsonl, checkpoint/).

    ``chatsmith.model.save_model`` replaces its target directory as a whole, so it writes ``OUT/.final-tmp``
    first and the files are then moved into ``out`` one by one (then the other model kind's files that an
    earlier run left are removed, `remove_other_model_kind`) (each move is an atomic rename on the same
    filesystem; an interrupted move leaves the resumable checkpoint untouched). Nothing outside ``out`` is
    touched; a staging directory left by a killed run is removed by the next run's claim on ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / FINAL_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_model(unwrap_model(model), tokenizer, staging, extra_files=extra_files, state_dict=state_dict)
        adapter = (staging / "adapter_config.json").is_file()
        for item in sorted(staging.rglob("*")):
            if item.is_file():
                target = out / item.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, target)
        remove_other_model_kind(out, adapter)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


FULL_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
                    "model-*-of-*.safetensors")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def remove_other_model_kind(out: Path, adapter: bool) -> None:
    """After a final save into ``out``: delete the model files of the other kind that an earlier run left there
    (a full model's after a LoRA adapter was saved, an adapter's after a full model), so that ``out`` loads as
    what was saved last, in chatsmith and in plain transformers / peft."""
    for pattern in FULL_MODEL_FILES if adapter else ADAPTER_FILES:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()
