"""Rates of the eval, overall and by slice: items tagged as a slice, and the depth of the reply in the chat.

    from chatsmith.eval.slices import sliced_aggregate, user_turns, depth_bucket
    rates, counts = sliced_aggregate(items, verdicts, specs)
    # {"refuses_harmful": 0.9, ..., "heldout_refuses_harmful": 0.8, ..., "turn1_rude": 0.0, "turn4plus_rude": 0.1}

- The suite's rates (`aggregate`) are over the items without a slice tag.
- An item whose `expected` has `"slice": NAME` (the world's held-out phrasings: `heldout`) counts only
  toward `NAME_<metric>` rates, so a suite can carry a re-worded copy of its categories beside the main one.
- When the untagged items reach more than one depth bucket, every rate is also reported per bucket of the
  user turn the reply answers: `turn1_`, `turn2_3_` and `turn4plus_` (`DEPTH_BUCKETS`).

Used by `chatsmith.eval.behaviour.evaluate_model`; `chatsmith.eval.report` shows these rates in their own
table (`split_metrics`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from chatsmith.eval.judges import default_specs, metric_specs

DEPTH_BUCKETS = (("turn1", 1, 1), ("turn2_3", 2, 3), ("turn4plus", 4, None))
"""(prefix, first user turn, last user turn or None): the reply to user turn 1, 2-3, 4 and later."""

Specs = dict[str, tuple[str, "tuple[str, ...] | None"]]


def user_turns(messages: Sequence[dict]) -> int:
    """How many user messages a prompt has: the reply answers user turn number `user_turns`."""
    return sum(1 for m in messages if m.get("role") == "user")


def depth_bucket(messages: Sequence[dict]) -> str:
    """The `DEPTH_BUCKETS` prefix of the reply to `messages` ("turn1", "turn2_3" or "turn4plus")."""
    n = max(1, user_turns(messages))
    return next(name for name, low, high in DEPTH_BUCKETS if n >= low and (high is None or n <= high))


def item_slice(item: Any) -> str | None:
    """The slice an item is tagged with (`expected["slice"]`), or None."""
    expected = getattr(item, "expected", None) or {}
    value = expected.get("slice") if isinstance(expected, dict) else None
    return str(value) if value else None


def aggregate(items: Sequence[Any], verdicts: Sequence[dict], specs: Specs | None = None,
              judge: str | Callable[..., dict] = "world") -> tuple[dict[str, float | None], dict[str, int]]:
    """Mean of each metric's verdict key over the items it applies to (None: no item applies).

    `specs` default: the judge's own `metrics`, else every verdict key overall and per category."""
    rates: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    specs = specs or metric_specs(judge) or default_specs(list(items), list(verdicts))
    for metric, (key, categories) in specs.items():
        values = [float(bool(v[key])) for item, v in zip(items, verdicts)
                  if (categories is None or item.category in categories) and v.get(key) is not None]
        rates[metric] = sum(values) / len(values) if values else None
        counts[metric] = len(values)
    return rates, counts


def sliced_aggregate(items: Sequence[Any], verdicts: Sequence[dict], specs: Specs | None = None,
                     judge: str | Callable[..., dict] = "world") -> tuple[dict[str, float | None], dict[str, int]]:
    """The suite's rates over untagged items, then `SLICE_<metric>` for each slice tag and, when the untagged
    items span more than one depth bucket, `turn1_<metric>`, `turn2_3_<metric>`, `turn4plus_<metric>`."""
    specs = specs or metric_specs(judge) or default_specs(list(items), list(verdicts))
    main = [(i, v) for i, v in zip(items, verdicts) if item_slice(i) is None]
    rates, counts = aggregate([i for i, _ in main], [v for _, v in main], specs, judge)
    groups: dict[str, list[tuple[Any, dict]]] = {}
    for item, verdict in zip(items, verdicts):
        name = item_slice(item)
        if name is not None:
            groups.setdefault(name, []).append((item, verdict))
    depths: dict[str, list[tuple[Any, dict]]] = {name: [] for name, _, _ in DEPTH_BUCKETS}
    for item, verdict in main:
        depths[depth_bucket(item.messages)].append((item, verdict))
    if sum(1 for rows in depths.values() if rows) > 1:
        groups.update(depths)
    for name, rows in groups.items():
        sub_rates, sub_counts = aggregate([i for i, _ in rows], [v for _, v in rows], specs, judge)
        rates.update({f"{name}_{m}": r for m, r in sub_rates.items()})
        counts.update({f"{name}_{m}": c for m, c in sub_counts.items()})
    return rates, counts


def split_metrics(metrics: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(the suite's metric names, {prefix: metrics reported with it}) for names like `heldout_rude`, `turn1_rude`:
    a name is prefixed when it is PREFIX_BASE with BASE one of the suite's own metrics."""
    names = list(metrics)
    base = [m for m in names if not any(m.startswith(f"{b}_") for b in _prefixes(names))]
    prefixes: dict[str, list[str]] = {}
    for m in names:
        for b in base:
            if m != b and m.endswith(f"_{b}") and m[: -len(b) - 1] in _prefixes(names):
                prefixes.setdefault(m[: -len(b) - 1], []).append(b)
                break
    return base, prefixes


def _prefixes(names: Sequence[str]) -> set[str]:
    """Slice and depth prefixes present in `names` (a prefix is a known depth bucket or a name such that
    PREFIX_X and X are both metrics)."""
    found = {p for p, _, _ in DEPTH_BUCKETS if any(n.startswith(p + "_") for n in names)}
    known = set(names)
    for n in names:
        head, _, tail = n.partition("_")
        if tail in known and head:
            found.add(head)
    return found
