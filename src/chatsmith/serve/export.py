"""`chatsmith feedback export`: human judgments (the SQLite file of `chatsmith serve --feedback`) as preference rows.

    chatsmith feedback export --db runs/feedback.db --out prefs.jsonl
    chatsmith reward --data prefs.jsonl ...        # or dpo: the file is chatsmith's preference format

Each row is {"prompt": messages, "chosen": text, "rejected": text}, plus "judgment": the id it came from.
How a judgment of responses A and B becomes rows:
  choice "a"          -> chosen A, rejected B
  choice "b"          -> chosen B, rejected A
  "tie", "both_bad"   -> no row (nothing says which is better); counted in the summary line
  an edited reply     -> with any choice, the person's edited reply is chosen over A and over B (two rows,
                         after the choice's own row if any)
A pair whose two texts are the same (after trimming spaces) says nothing and is skipped (counted).
The file is written atomically, oldest judgment first.

Tests: `python -m pytest tests/test_feedback.py -q`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatsmith.config import arg
from chatsmith.errors import ChatsmithError
from chatsmith.serve.feedback import Judgment, open_existing
from chatsmith.utils import write_jsonl

__all__ = ["FeedbackExportConfig", "ExportSummary", "judgment_rows", "export_feedback"]


@dataclass
class FeedbackExportConfig:
    db: str = arg(None, "The judgments database (what `chatsmith serve --feedback DB` writes).")
    out: str = arg(None, "Preference JSONL to write (replaced atomically).")


@dataclass
class ExportSummary:
    """What an export wrote and what it skipped, by reason."""

    judgments: int = 0
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"tie": 0, "both_bad": 0, "identical": 0})
    edited: int = 0

    def line(self, out: str) -> str:
        s = self.skipped
        return (f"feedback export: {self.judgments} judgments -> {self.rows} preference rows in {out} "
                f"({self.edited} with an edited reply; skipped: {s['tie']} ties, {s['both_bad']} both bad, "
                f"{s['identical']} identical pairs)")


def judgment_rows(j: Judgment, summary: ExportSummary | None = None) -> list[dict[str, Any]]:
    """The preference rows of one judgment, by the rules of the module docstring."""
    summary = summary if summary is not None else ExportSummary()
    pairs: list[tuple[str, str]] = []
    if j.choice == "a":
        pairs.append((j.response_a, j.response_b))
    elif j.choice == "b":
        pairs.append((j.response_b, j.response_a))
    else:
        summary.skipped[j.choice] += 1
    if j.edited is not None and j.edited.strip():
        summary.edited += 1
        pairs += [(j.edited, j.response_a), (j.edited, j.response_b)]
    rows = []
    for chosen, rejected in pairs:
        if chosen.strip() == rejected.strip():
            summary.skipped["identical"] += 1
            continue
        rows.append({"prompt": j.prompt, "chosen": chosen, "rejected": rejected, "judgment": j.id})
    return rows


def export_feedback(cfg: FeedbackExportConfig) -> int:
    """Write the preference rows of every judgment in ``cfg.db`` to ``cfg.out``; prints a summary line."""
    if not cfg.db or not cfg.out:
        raise ChatsmithError("feedback export: give --db DB and --out FILE.jsonl")
    if Path(cfg.out).resolve() == Path(cfg.db).resolve():
        raise ChatsmithError(f"--out {cfg.out}: is the database itself; give another file")
    store = open_existing(cfg.db)
    try:
        judgments = store.judgments()
    finally:
        store.close()
    summary = ExportSummary(judgments=len(judgments))
    rows = [row for j in judgments for row in judgment_rows(j, summary)]
    summary.rows = write_jsonl(cfg.out, rows)
    print(summary.line(cfg.out), flush=True)
    return 0
