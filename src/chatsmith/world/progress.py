"""The demo's pipeline progress: one bar for all stages (stage i/N, the stage's step, the pipeline's ETA).

    progress = PipelineProgress({"pretrain": 90.0, "sft": 105.0})   # expected seconds per stage
    progress.begin(1, "pretrain", Path("runs/demo/base")); ...; progress.end("pretrain")

Used by `chatsmith.world.demo`; it reads a running stage's steps from its metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


class PipelineProgress:
    """One progress display for the whole pipeline: stage i/N, the stage's step, and the pipeline's ETA.

    Stages run with their own bars off; a background thread reads the running stage's metrics.jsonl
    (its last logged step) against its step budget (train_config.yaml, written when training starts).
    The bar's unit is an expected second of work (PROFILES[...]["seconds"]), so the ETA weighs stages
    by their usual cost. On a non-interactive stderr it prints a status line every 20 seconds instead.
    """

    def __init__(self, weights: dict[str, float], enabled: bool = True, n_stages: int | None = None):
        self.weights = weights
        self.n_stages = n_stages or len(weights)   # the pipeline's stage count, shown as "i/N"
        self.total = float(sum(weights.values()))
        self.done_weight = 0.0
        self.actual: dict[str, float] = {}     # wall seconds of the stages run (not skipped) so far
        self.stage: str | None = None
        self.index = 0
        self.stage_dir: Path | None = None
        self.stage_start = time.time()
        self.start = time.time()
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_line = 0.0
        if self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=round(self.total), unit="s", dynamic_ncols=True, file=sys.stderr,
                            bar_format="{desc} |{bar}| {percentage:3.0f}% [{postfix}]")
        if enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def begin(self, index: int, stage: str, directory: Path | None) -> None:
        self.index, self.stage, self.stage_dir = index, stage, directory
        self.stage_start = time.time()
        self._show(force=True)

    def end(self, stage: str, skipped: bool = False) -> None:
        self.done_weight += self.weights.get(stage, 0.0)
        if not skipped:
            self.actual[stage] = time.time() - self.stage_start
        if skipped:
            self.log(f"[demo {self.index}/{self.n_stages}] {stage}: already done, skipped")
        self.stage = None
        self._show(force=True)

    def stage_fraction(self) -> tuple[float, str]:
        """(fraction of the running stage done, 'step k/n' or ''); a reward ensemble's members (OUT/members/)
        count in turn: 'step k/n, model m/N'."""
        if self.stage_dir is None:
            return 0.0, ""
        from chatsmith.train.reward import ENSEMBLE_MEMBERS

        config = _train_config(self.stage_dir)
        total = int(config.get("max_steps") or 0)
        size = max(1, int(config.get("ensemble") or 1))
        runs = [self.stage_dir] + [self.stage_dir / ENSEMBLE_MEMBERS / f"member-{k}" for k in range(1, size)]
        steps = [_last_logged_step(d) for d in runs]
        if not total or steps[0] is None:
            return 0.0, ""
        done = [min(total, s or 0) for s in steps]
        current = next((k for k, s in enumerate(done) if s < total), size - 1)
        label = f"step {done[current]}/{total}" + (f", model {current + 1}/{size}" if size > 1 else "")
        return min(1.0, sum(done) / (total * size)), label

    def eta(self, fraction: float) -> float:
        """Seconds left: the running stage extrapolated from its own step rate once it has logged a step,
        else from its expected time; later stages from their expected times, scaled by how fast the
        finished stages ran compared with their expectation (this machine's speed)."""
        elapsed_in_stage = time.time() - self.stage_start
        measured = [(self.actual[s], self.weights[s]) for s in self.actual if self.weights.get(s, 0) >= 20]
        speed = (sum(a for a, _ in measured) / sum(w for _, w in measured)) if measured else 1.0
        if self.stage is None:
            current = 0.0
        elif fraction > 0.02:
            current = elapsed_in_stage * (1 - fraction) / fraction
        else:
            current = max(0.0, self.weights.get(self.stage, 0.0) * speed - elapsed_in_stage)
        later = list(self.weights)[list(self.weights).index(self.stage) + 1:] if self.stage in self.weights else []
        return current + speed * sum(self.weights[s] for s in later)

    def _show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        fraction, step_text = self.stage_fraction() if self.stage else (0.0, "")
        position = self.done_weight + fraction * self.weights.get(self.stage or "", 0.0)
        label = f"demo {self.index}/{self.n_stages} {self.stage}" if self.stage else "demo"
        if step_text:
            label += f" ({step_text})"
        timing = f"elapsed {_clock(time.time() - self.start)}, ETA {_clock(self.eta(fraction))}"
        if self.bar is not None:
            self.bar.set_description_str(label, refresh=False)
            self.bar.set_postfix_str(timing, refresh=False)
            self.bar.n = min(round(position), round(self.total))
            self.bar.refresh()
        elif force or time.time() - self._last_line >= 20:
            self._last_line = time.time()
            print(f"[{label}] {timing}", file=sys.stderr, flush=True)

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self._show()
            except Exception:  # noqa: BLE001 - a display glitch must never stop training
                pass

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _train_config(directory: Path) -> dict:
    """The running stage's train_config.yaml ({} while it does not exist or is being rewritten)."""
    path = directory / "train_config.yaml"
    if not path.is_file():
        return {}
    try:
        import yaml

        return yaml.safe_load(path.read_text()) or {}
    except Exception:  # noqa: BLE001 - a file being rewritten; try again on the next poll
        return {}


def _last_logged_step(directory: Path) -> int | None:
    path = directory / "metrics.jsonl"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = [line for line in fh.read().decode("utf-8", "replace").splitlines() if line.strip()]
        for line in reversed(lines):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
    except OSError:
        return None
    return None


