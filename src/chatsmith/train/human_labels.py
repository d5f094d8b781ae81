"""People as the labeler of `chatsmith rlhf --labeler human --feedback DB`: a round's samples become pairs
queued in the feedback database, people judge them in the web page's label mode, and the judgments come
back as the round's comparisons.

    chatsmith rlhf --labeler human --feedback runs/feedback.db ... --out runs/rlhf   # samples, queues, stops
    chatsmith serve runs/sft --feedback runs/feedback.db     # people judge at http://127.0.0.1:8000/#label
    chatsmith rlhf --labeler human --feedback runs/feedback.db ... --out runs/rlhf   # the same: continues

Pairs: each prompt's distinct non-empty responses, in sampling order, paired off (1st with 2nd, 3rd with
4th, ...): K/2 pairs per prompt, each response judged once (people's time is the cost). The samples are
independent draws, so which one is A is already random. A round waiting for judgments keeps
`round_k/labels_pending.json` (the pairs' batch name in the database); running the command again reads it,
continues that round (finished rounds skipped, as with --resume) and stops again while any pair of the
batch is unjudged. A judgment becomes comparisons by the rules of `chatsmith feedback export`: A or B
chosen -> one, a tie or both bad -> none, an edited reply -> preferred to both responses.

Tests: `python -m pytest tests/test_rlhf_human.py -q`.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError

__all__ = ["PENDING_FILE", "LabelsPending", "pairs_of_samples", "queue_round", "round_batch", "judged_comparisons",
           "waiting_rounds"]

PENDING_FILE = "labels_pending.json"


class LabelsPending(Exception):
    """A round stopped to wait for people's judgments (not an error: the command says what to do next)."""

    def __init__(self, round_index: int, pending: int, total: int, db: str, policy: str):
        self.round, self.pending, self.total = round_index, pending, total
        judged = total - pending
        super().__init__(
            f"rlhf: round {round_index}: {pending} of {total} pairs wait for people's judgments in {db}"
            + (f" ({judged} judged so far)" if judged else "") + ".\n"
            f"  Label them: chatsmith serve {policy} --feedback {db}\n"
            f"  then open http://127.0.0.1:8000/#label and judge each pair;\n"
            f"  then run this same command again to continue the round (reward model, PPO).")


def waiting_rounds(out: str | Path) -> list[Path]:
    """The round folders of the run in ``out`` that wait for judgments."""
    return sorted(p.parent for p in Path(out).glob(f"round_*/{PENDING_FILE}")
                  if not (p.parent / "done.json").is_file())


def pairs_of_samples(sample_rows: list[dict[str, Any]], batch: str, model: str) -> list:
    """The pairs to judge from a round's sample rows ({"prompt", "responses", "round"}), see the docstring."""
    from chatsmith.serve.feedback import Pair

    pairs = []
    for index, row in enumerate(sample_rows):
        distinct = list(dict.fromkeys(t for t in row["responses"] if t.strip()))
        for i in range(0, len(distinct) - 1, 2):
            pairs.append(Pair(batch=batch, prompt=row["prompt"], response_a=distinct[i], response_b=distinct[i + 1],
                              model_a=model, model_b=model,
                              metadata={"source": "rlhf", "round": row.get("round"), "sample": index}))
    return pairs


def round_batch(rdir: Path) -> str:
    """A new batch name for the round in ``rdir``: its path plus a random tag, so a run started over in the
    same folder never picks up an earlier run's pairs."""
    return f"rlhf {Path(rdir).resolve()} {uuid.uuid4().hex[:8]}"


def queue_round(store: Any, rdir: Path, sample_rows: list[dict[str, Any]], model: str) -> str:
    """Queue the pairs of ``sample_rows`` in ``store`` and write the round's pending marker; returns the batch."""
    from chatsmith.utils import atomic_write_text

    batch = round_batch(rdir)
    pairs = pairs_of_samples(sample_rows, batch, model)
    if not pairs:
        raise ChatsmithError(f"rlhf: {rdir.name}: every prompt's samples were the same text or empty, so there is "
                             f"nothing to compare; sample more (--samples-per-prompt, --temperature)")
    store.queue_pairs(pairs)
    atomic_write_text(rdir / PENDING_FILE, json.dumps({"batch": batch, "pairs": len(pairs),
                                                       "db": str(store.path)}) + "\n")
    return batch


def judged_comparisons(store: Any, batch: str, round_index: int) -> tuple[list[dict[str, Any]], int, int]:
    """The comparisons ({"prompt", "ranked": [better, worse], ...}) from the judgments of ``batch``.

    Returns (comparisons, pending pairs, total pairs); the comparisons are complete only when nothing is pending."""
    from chatsmith.serve.export import judgment_rows

    pairs = store.pairs(batch)
    if not pairs:
        raise ChatsmithError(f"--feedback {store.path}: no pairs of this round's batch ({batch}); is it the database "
                             f"the round queued them in?")
    pending = sum(p.judgment is None for p in pairs)
    if pending:
        return [], pending, len(pairs)
    judged = {p.judgment for p in pairs}
    comparisons = []
    for j in store.judgments():
        if j.id in judged:
            comparisons += [{"prompt": row["prompt"], "ranked": [row["chosen"], row["rejected"]], "round": round_index,
                             "labeler": "human", "judgment": j.id} for row in judgment_rows(j)]
    return comparisons, 0, len(pairs)
