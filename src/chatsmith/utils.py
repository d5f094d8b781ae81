"""Small shared helpers: seeding, atomic file writes, JSONL, rank awareness, messages, metrics logging.

Tests: every test file uses them; `python -m pytest tests/test_train_loop.py -q` covers the metrics file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np


# ----------------------------------------------------------------------------- distributed

def rank() -> int:
    """Global rank under torchrun (RANK), 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def note(message: str) -> None:
    """One progress or warning line on stderr, from the main process only (flushed at once)."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def init_distributed(device: str = "auto") -> bool:
    """Join the torchrun process group (once per process) when WORLD_SIZE > 1; True when distributed.

    NCCL when training on CUDA (each rank on its LOCAL_RANK's GPU), else gloo, so a CPU-only machine (or
    `--device cpu`) can run `torchrun --nproc-per-node 2 -m chatsmith sft ...` too. Without it every rank
    would train its own unsynchronised copy of the model on its shard of the data.
    """
    import torch

    if world_size() <= 1 or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        on_cuda = str(resolve_device(device)).startswith("cuda")
        if on_cuda:
            torch.cuda.set_device(local_rank())
        torch.distributed.init_process_group(backend="nccl" if on_cuda else "gloo")
    return True


def process_group_ready() -> bool:
    """True once this process has joined a torch.distributed process group."""
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in one process): e.g. while rank 0 writes the final model."""
    import torch

    if process_group_ready():
        torch.distributed.barrier()


def shutdown_distributed() -> None:
    """Leave the process group before the interpreter exits; gloo aborts the process ("terminate called
    without an active exception") when its threads are torn down with the group still alive."""
    import torch

    if process_group_ready():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- seeding / devices

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A per-step seed, so the random draws of step k (an RL rollout, a minibatch order) are the same in a
    resumed and an uninterrupted run; ``salt`` separates the streams used within one step."""
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**31 - 1)


def resolve_device(device: str = "auto") -> str:
    """'auto' picks cuda (the local rank's GPU under torchrun), then mps, then cpu. A named device that this
    machine does not have is a `ChatsmithError` naming --device."""
    import torch

    if device != "auto":
        check_device(device)
        return device
    if torch.cuda.is_available():
        return f"cuda:{local_rank()}" if world_size() > 1 else "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str, flag: str = "--device") -> None:
    """Refuse a device this machine does not have (no CUDA, a GPU index past the last one, no MPS), naming
    the flag that asked for it."""
    if device in ("auto", "cpu"):
        return
    import torch

    from chatsmith.errors import ChatsmithError

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ChatsmithError(f"{flag}: expected cpu, cuda, cuda:N, mps or auto, got {device!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ChatsmithError(f"{flag} {device}: CUDA is not available ({why}); use --device cpu or auto")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ChatsmithError(f"{flag} {device}: there is no GPU {parsed.index} "
                                 f"({torch.cuda.device_count()} visible)")
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ChatsmithError(f"{flag} {device}: MPS (Apple GPU) is not available; use --device cpu or auto")


# ----------------------------------------------------------------------------- atomic files

_UMASK = os.umask(0)
os.umask(_UMASK)


def is_disk_full(exc: BaseException) -> bool:
    """Did a write fail because the disk (or the quota) is full? torch.save and safetensors wrap the OSError
    in their own exceptions, so their messages are read too."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded",
                                   "os error 28", "code: 28"))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target.

    A crash at any point leaves either the old file or the new one, never a torn mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; files we write are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp directory; on success it atomically replaces ``path``.

    The previous directory is moved aside first and deleted only after the new one is in place,
    so a crash or Ctrl-C at any moment leaves a complete ``path`` (old or new) or a complete
    ``path.old`` that :func:`recover_directory` puts back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
        _fsync_tree(tmp)
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_directory(path: str | Path) -> None:
    """Undo a replacement interrupted between its two renames."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


# ----------------------------------------------------------------------------- JSONL

def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Strict reader for files chatsmith wrote itself (user data goes through chatsmith.data)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(path, text)
    return text.count("\n")


# ----------------------------------------------------------------------------- metrics

class MetricsLogger:
    """Appends one JSON object per call to ``OUT/metrics.jsonl`` (main process only)."""

    def __init__(self, out_dir: str | Path, stage: str | None = None, enabled: bool | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.stage = stage
        self.enabled = is_main_process() if enabled is None else enabled
        self.start = time.time()
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, **metrics: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step}
        if self.stage:
            row["stage"] = self.stage
        row["time"] = round(time.time() - self.start, 3)
        for k, v in metrics.items():
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, float):
                v = round(v, 6)
            row[k] = v
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        return row

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the file matches the run."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []
