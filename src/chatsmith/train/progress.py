"""What a run shows and writes as it goes: the progress bar, the TensorBoard event files (`--report-to
tensorboard`) and the table of sample responses (`samples.jsonl`) of the RL stages.

    progress = Progress(total=200, desc="sft")
    progress.update(1, tokens, loss=2.1)
    board = TensorBoardWriter("runs/sft/tensorboard")       # tags train/loss, eval/loss, ...
    board.log(step, {"loss": 2.1, "eval_loss": 2.3})

metrics.jsonl itself is `chatsmith.utils.MetricsLogger`. Tests: `python -m pytest tests/test_train_loop.py -q`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError
from chatsmith.utils import atomic_write_text, is_main_process, read_jsonl

__all__ = ["Progress", "TensorBoardWriter", "tensorboard_tag", "format_samples_table", "append_samples",
           "truncate_samples"]


class Progress:
    """A tqdm bar on the main process showing the step's loss (or score), throughput and (from tqdm) the ETA.
    ``unit`` names what ``update`` counts: tokens for the supervised stages, episodes for RL."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True,
                 unit: str = "tok"):
        self.bar = None
        self.unit = unit
        self.tokens = 0
        self.start = time.perf_counter()
        if enabled and is_main_process():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5)

    def update(self, n_steps: int, tokens: int, **postfix: float) -> float:
        """Advance; returns units (tokens, episodes) per second since the bar started."""
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.start)
        if self.bar is not None:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
            shown[f"{self.unit}/s"] = f"{rate:,.0f}"
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
            self.bar = None


# ----------------------------------------------------------------------------- TensorBoard

def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metrics key, grouped as transformers' Trainer does: ``eval_loss`` ->
    ``eval/loss``, everything else under ``train/`` (``loss`` -> ``train/loss``)."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


class TensorBoardWriter:
    """Writes the numeric metrics of each logged row as TensorBoard scalars (main process only).

    ``purge_step``: on resume, the first step this run will write; TensorBoard then hides what an earlier,
    interrupted run wrote from that step on, as metrics.jsonl drops those rows."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        self.writer = None
        if not is_main_process():
            return
        summary_writer = require_tensorboard()
        self.writer = summary_writer(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(tensorboard_tag(key), value, global_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def require_tensorboard() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or a clear error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ChatsmithError("--report-to tensorboard needs the tensorboard package: "
                             "pip install tensorboard (or chatsmith[tensorboard])") from None
    return SummaryWriter


# ----------------------------------------------------------------------------- samples

def format_samples_table(rows: list[dict[str, Any]], width: int = 60) -> str:
    """A plain-text table of (prompt, response, score) rows for the terminal."""
    def cut(text: str) -> str:
        text = " ".join(str(text).split())
        return text if len(text) <= width else text[:width - 1] + "…"

    if not rows:
        return ""
    lines = [f"samples at step {rows[0]['step']}:", f"  {'score':>7}  {'prompt':<{width}}  response"]
    for r in rows:
        mark = "" if r.get("ended_turn", True) else " [no end-of-turn]"
        lines.append(f"  {r['score']:>7.3f}  {cut(r['prompt']):<{width}}  {cut(r['response'])}{mark}")
    return "\n".join(lines)


def append_samples(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to a samples.jsonl (main process only)."""
    if not is_main_process():
        return
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def truncate_samples(path: str | Path, step: int) -> None:
    """On resume, drop sample rows written after the checkpoint's step (main process only)."""
    path = Path(path)
    if is_main_process() and path.exists():
        kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
