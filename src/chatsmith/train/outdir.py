"""An output directory belongs to one run: who may train into `--out`, its lock, and the leftovers of a dead run.

    claim = claim_out_dir(cfg, "sft")      # checks, then OUT/.lock and OUT/.chatsmith-run.json; before any write
    ...
    claim.release()                        # at the end of the run; at the latest when the process exits

The rules, checked before chatsmith writes anything:
- `--out` is a directory (or does not exist yet) and is not, nor is inside, an input model of the command
  (`--model`, `--policy`, `--reference`, `--reward-model`, `--value-model`, `--reward rm:DIR`), and no
  input model is an int8 one (`chatsmith quantize`: inference only);
- a non-empty `--out` must be a chatsmith run of the same command (OUT/.chatsmith-run.json names its
  stage; a run from before that marker is recognised by its checkpoint or metrics), unless `--overwrite`:
  then chatsmith deletes its own run files there (`RUN_FILES`) and replaces its model files at the end,
  never touching any other file; `--resume` continues a run of the same command;
- the directories chatsmith replaces as a whole (checkpoint/, checkpoint-best/, tensorboard/) hold only
  what chatsmith writes there: a file of the user's in one of them is named and the run refused;
- one run at a time: OUT/.lock (created with O_EXCL) holds the pid; a second run is refused naming it, the
  lock of a pid that no longer runs is taken over with a notice.
After the lock is held, temporary files of an interrupted write (`.checkpoint.*.tmp`, `.final-tmp`) are removed.

Tests: `python -m pytest tests/test_reliability.py -q`.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError
from chatsmith.train.checkpoint import FINAL_STAGING
from chatsmith.utils import atomic_write_text, is_main_process, note

__all__ = ["MARKER", "LOCK", "RUN_FILES", "FINAL_STAGING", "OutDirClaim", "claim_out_dir", "run_stage_of",
           "input_model_dirs", "refuse_int8_inputs"]

MARKER = ".chatsmith-run.json"
LOCK = ".lock"
# What a run writes besides the model files; --overwrite deletes these (and only these).
RUN_FILES = ("train_config.yaml", "metrics.jsonl", "samples.jsonl", "checkpoint", "checkpoint-best",
             "checkpoint.old", "checkpoint-best.old", "tensorboard", FINAL_STAGING, MARKER)
# Directories chatsmith replaces as a whole, and what may live in each.
OWNED_DIRS = {"checkpoint": ("model.safetensors", "state.pt", "trainer_state.json", "tokenizer"),
              "checkpoint-best": ("model.safetensors", "trainer_state.json"),
              "tensorboard": ("events.out.tfevents.",)}
# Temporary names of interrupted atomic writes (utils.atomic_directory / atomic_write_bytes) in OUT.
STALE_PATTERNS = (".checkpoint.*.tmp", ".checkpoint-best.*.tmp", f".{FINAL_STAGING}.*.tmp", f"{FINAL_STAGING}.old",
                  FINAL_STAGING, ".metrics.jsonl.*.tmp", ".samples.jsonl.*.tmp", ".train_config.yaml.*.tmp",
                  f".{MARKER}.*.tmp", f".{LOCK}.*.tmp")
MODEL_FIELDS = ("model", "policy", "reference", "reward_model", "value_model", "start_policy")


def input_model_dirs(cfg: Any) -> list[tuple[str, Path]]:
    """(flag, directory) of every input model the config names that exists on disk."""
    found = []
    for name in MODEL_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, str) and value:
            found.append((f"--{name.replace('_', '-')}", Path(value)))
    reward = getattr(cfg, "reward", None)
    if isinstance(reward, str) and reward.startswith("rm:"):
        found.append(("--reward", Path(reward[3:])))
    return [(flag, path) for flag, path in found if path.is_dir()]


def run_stage_of(out: Path) -> str | None:
    """The stage of the chatsmith run in ``out`` (its marker, else an older run's checkpoint or metrics)."""
    marker = _read_json(out / MARKER)
    if marker and isinstance(marker.get("stage"), str):
        return marker["stage"]
    if (out / "rlhf_config.yaml").is_file():
        return "rlhf"
    if not (out / "train_config.yaml").is_file():
        return None
    state = _read_json(out / "checkpoint" / "trainer_state.json")
    if state and isinstance(state.get("stage"), str):
        return state["stage"]
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0]
        stage = json.loads(first).get("stage")
        if isinstance(stage, str):
            return stage
    return None


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's live process
        return True
    return True


def _foreign_entries(out: Path, resume: bool) -> list[Path]:
    """Files inside the directories chatsmith replaces as a whole that chatsmith did not write there."""
    foreign = []
    for name, allowed in OWNED_DIRS.items():
        folder = out / name
        if name == "tensorboard" and resume:          # appended to, not replaced, on resume
            continue
        if folder.is_dir():
            foreign += [p for p in sorted(folder.iterdir()) if not any(p.name.startswith(a) for a in allowed)]
        elif folder.exists():
            foreign.append(folder)
    return foreign


def refuse_int8_inputs(cfg: Any, stage: str) -> None:
    """Training needs float weights: an int8 model (`chatsmith quantize`) as any input model is refused."""
    from chatsmith.quantize import int8_source, is_int8_dir

    for flag, model_dir in input_model_dirs(cfg):
        if is_int8_dir(model_dir):
            raise ChatsmithError(f"{flag} {model_dir}: an int8 model (chatsmith quantize) is for inference only "
                                 f"(generate, chat, eval, serve); {stage} needs the float model it was made from "
                                 f"({int8_source(model_dir)}); quantize the result after training")


def check_out_dir(cfg: Any, stage: str) -> None:
    """Refuse an --out this run may not use (read-only; every rank checks the flags, the main process what
    OUT holds). See the module docstring."""
    out = Path(cfg.out)
    overwrite = bool(getattr(cfg, "overwrite", False))
    if overwrite and getattr(cfg, "resume", False):
        raise ChatsmithError("--overwrite and --resume contradict each other: --resume continues the run in "
                             f"{out}, --overwrite starts a new one there; pass one of them")
    if out.exists() and not out.is_dir():
        raise ChatsmithError(f"--out {out}: exists and is not a directory; give a directory for the run")
    target = out.resolve()
    refuse_int8_inputs(cfg, stage)
    for flag, model_dir in input_model_dirs(cfg):
        source = model_dir.resolve()
        if target == source or source in target.parents:
            where = "is" if target == source else "is inside"
            raise ChatsmithError(f"--out {out} {where} the input model {flag} {model_dir}: training would "
                                 f"overwrite it; choose another --out")
    if not is_main_process():
        return      # what is in OUT is the main process's to judge: it may be writing there already
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    if entries and not overwrite:
        owner = run_stage_of(out)
        if owner is None:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ChatsmithError(f"--out {out}: not empty and not a chatsmith {stage} run (found {shown}); "
                                 f"choose an empty or new directory, or pass --overwrite to train there (chatsmith "
                                 f"then replaces only its own files)")
        if owner != stage:
            raise ChatsmithError(f"--out {out} holds a chatsmith {owner} run, not {stage}; choose another --out, "
                                 f"or pass --overwrite to replace it")
    foreign = _foreign_entries(out, resume=bool(getattr(cfg, "resume", False)))
    if stage == "ppo" and (out / "value").exists() and run_stage_of(out) != "ppo":
        raise ChatsmithError(f"{out / 'value'}: ppo writes its value model there, replacing the directory as a "
                             f"whole; move it elsewhere first")
    if foreign:
        raise ChatsmithError(f"{foreign[0]}: not a file chatsmith wrote, in a directory a run replaces as a whole; "
                             f"move it out of {foreign[0].parent} first")


@dataclass
class OutDirClaim:
    """The run's hold on OUT: its lock file (released at exit) and the stage marker."""

    out: Path
    lock: Path | None = None

    def release(self) -> None:
        """Remove OUT/.lock if it is still this process's."""
        if self.lock is not None and _lock_pid(self.lock) == os.getpid():
            with contextlib.suppress(OSError):
                self.lock.unlink()
        self.lock = None


def _lock_pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _unwritable(out: Path, exc: OSError) -> ChatsmithError:
    reason = exc.strerror or str(exc)
    return ChatsmithError(f"--out {out}: cannot write there ({reason}); choose a directory you can write to")


def _take_lock(out: Path) -> Path:
    lock = out / LOCK
    text = f"{os.getpid()}\n"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _lock_pid(lock)
            if pid == os.getpid():                 # this process's earlier run (a library user, a test)
                return lock
            if pid is not None and _pid_running(pid):
                raise ChatsmithError(f"--out {out} is in use by another chatsmith run (pid {pid}, see {lock}); "
                                     f"wait for it to finish, stop it, or choose another --out") from None
            note(f"{lock}: taking over the lock of a run that is no longer running (pid {pid})")
            atomic_write_text(lock, text)
            if _lock_pid(lock) == os.getpid():
                return lock
            continue                               # another run took it over at the same moment
        except OSError as exc:
            raise _unwritable(out, exc) from exc
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return lock
    raise ChatsmithError(f"--out {out}: could not take {lock}; is another run starting there?")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def claim_out_dir(cfg: Any, stage: str) -> OutDirClaim:
    """Check OUT (every rank), then on the main process create it, take its lock, clear what --overwrite
    replaces and the leftovers of a dead run, and mark it as this stage's run."""
    check_out_dir(cfg, stage)
    out = Path(cfg.out)
    claim = OutDirClaim(out)
    if not is_main_process():
        return claim
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(out, exc) from exc
    claim.lock = _take_lock(out)
    atexit.register(claim.release)
    try:
        if getattr(cfg, "overwrite", False):
            for name in RUN_FILES:
                _remove(out / name)
        for pattern in STALE_PATTERNS:
            for path in sorted(out.glob(pattern)):
                if path.name.startswith(".checkpoint"):
                    note(f"{out}: removing {path.name}, the temporary directory of an interrupted checkpoint write")
                _remove(path)
        atomic_write_text(out / MARKER, json.dumps({"stage": stage}) + "\n")
    except OSError as exc:
        claim.release()
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _unwritable(out, exc) from exc
        raise
    return claim
