"""Several eval reports side by side (one per seed, or one per recipe): for every model and metric, the value
in each report, the mean and the worst; and the safety/helpfulness scatter with one point per model and report.

    chatsmith eval compare runs/demo-s0 runs/demo-s1 runs/demo-s2 --out runs/seeds
    chatsmith eval compare runs/demo-s0 runs/demo-s1 --labels "seed 0" "seed 1"
    chatsmith eval compare a/report.json b/report.json --models sft ppo --metrics refuses_harmful over_refusal

Each argument is a `report.json`, an `eval --out` directory, or a `demo --out` directory (its `report/`).
Writes OUT/compare.md (one table per model), OUT/compare.json and OUT/safety.png (refusal of harmful against
refusal of benign requests, `chatsmith.eval.plots.safety_png`), and prints the markdown.

"Worst" is the lowest value of a metric where higher is better and the highest where lower is better
(`rude`, `over_refusal`, `kl_to_sft`, and any metric whose report help says "lower is better"): the figure a
result must meet on every seed, as in "mean 0.95 (worst seed 0.90)".

"±95%" is the sampling noise of a rate measured on a finite eval set: half the width of the 95% Wilson
interval at the mean rate and the reports' item count (a report's `counts`). A rate of 0.90 on 56 harmful
requests is 0.79-0.95; two seeds that differ by less than that may not differ at all. compare.json gives
each value its own interval.

Tests: `python -m pytest tests/test_eval.py -q -k compare`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from chatsmith.config import arg
from chatsmith.errors import ChatsmithError
from chatsmith.utils import atomic_write_text

__all__ = ["CompareConfig", "compare_cli", "find_report", "compare_reports", "lower_is_better", "compare_markdown",
           "wilson_interval"]

LOWER_IS_BETTER = frozenset({"rude", "over_refusal", "kl_to_sft", "continues_document"})
NOT_RATES = frozenset({"mean_reward", "kl_to_sft"})   # scores, not shares of items: no Wilson interval


@dataclass
class CompareConfig:
    reports: list[str] = arg([], "Reports to compare: report.json files, eval --out or demo --out directories.")
    out: str = arg("runs/compare", "Output directory: compare.md, compare.json, safety.png.")
    labels: list[str] = arg([], "A label per report, in order (default: each report's run directory name).")
    models: list[str] = arg([], "Models to show (default: every model of the first report).")
    metrics: list[str] = arg([], "Metrics to show, e.g. refuses_harmful heldout_rude turn4plus_memory "
                                 "(default: the first report's headline metrics).")


def find_report(path: str | Path) -> Path:
    """The report.json that ``path`` names: the file itself, DIR/report.json or DIR/report/report.json."""
    path = Path(path)
    for candidate in (path, path / "report.json", path / "report" / "report.json"):
        if candidate.is_file():
            return candidate
    raise ChatsmithError(f"{path}: no report found (expected a report.json, an `eval --out` directory holding "
                         "report.json, or a `demo --out` directory holding report/report.json)")


def _load(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChatsmithError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("models"), dict):
        raise ChatsmithError(f"{path}: not a chatsmith eval report (no 'models' object)")
    return report


def _label(path: Path) -> str:
    """A report's default label: its run directory (runs/demo-s1/report/report.json -> demo-s1)."""
    folder = path.parent
    return folder.parent.name if folder.name == "report" else folder.name or path.stem


def lower_is_better(metric: str, report: dict[str, Any] | None = None) -> bool:
    """Whether smaller values of ``metric`` are better (a slice's rate, e.g. heldout_rude, as its metric's)."""
    helps = (report or {}).get("metric_help") or {}
    for name in (metric, _unsliced(metric, report)):
        if name in LOWER_IS_BETTER or "lower is better" in str(helps.get(name, "")):
            return True
    return False


def _unsliced(metric: str, report: dict[str, Any] | None) -> str:
    for prefix in ((report or {}).get("slice_metrics") or {}):
        if metric.startswith(prefix + "_"):
            return metric[len(prefix) + 1:]
    return metric


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927) of a rate observed on ``n`` items, at ``z`` standard errors
    (1.96: 95%). Unlike the normal interval it stays inside [0, 1] and is not empty at rates of 0 or 1, which
    is why Brown, Cai and DasGupta (2001) recommend it for the small counts of an eval set.
    ``wilson_interval(0.5, 10) == (0.2366…, 0.7634…)``."""
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be positive, got {n}")
    z2 = z * z
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _count(report: dict[str, Any], model: str, metric: str) -> int | None:
    """How many items ``metric`` was measured on for ``model`` (the report's ``counts``), or None."""
    n = ((report["models"].get(model) or {}).get("counts") or {}).get(metric)
    return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 else None


def compare_reports(reports: Sequence[dict[str, Any]], labels: Sequence[str], models: Sequence[str] = (),
                    metrics: Sequence[str] = ()) -> dict[str, Any]:
    """``{"labels", "models": {model: {metric: {"values": [one per report, None where missing], "mean",
    "worst", "lower_is_better", "counts", "intervals", "noise"}}}}`` over the reports; mean and worst over the
    reports that have the value. For a rate with item counts: each value's 95% Wilson interval, and "noise",
    half the interval's width at the mean rate and the mean count (None for other metrics)."""
    if not reports:
        raise ChatsmithError("eval compare: give at least one report")
    first = reports[0]
    models = list(models) or list(first["models"])
    metrics = list(metrics) or list(first.get("metrics") or [])
    if not metrics:
        raise ChatsmithError("eval compare: the first report lists no metrics; name them with --metrics")
    for model in models:
        if not any(model in r["models"] for r in reports):
            raise ChatsmithError(f"--models: no report has a model named {model!r} "
                                 f"(the first has {', '.join(first['models'])})")
    table: dict[str, dict[str, Any]] = {}
    for model in models:
        rows = {}
        for metric in metrics:
            values = [_number(r["models"].get(model, {}).get(metric)) for r in reports]
            present = [v for v in values if v is not None]
            if not present:
                continue
            low = lower_is_better(metric, first)
            mean = statistics.fmean(present)
            is_rate = _unsliced(metric, first) not in NOT_RATES and all(0 <= v <= 1 for v in present)
            counts = [_count(r, model, metric) if is_rate else None for r in reports]
            rated = [(v, n) for v, n in zip(values, counts) if v is not None and n is not None]
            noise = None
            if rated:
                lo, hi = wilson_interval(mean, round(statistics.fmean(n for _, n in rated)))
                noise = (hi - lo) / 2
            rows[metric] = {"values": values, "mean": mean, "worst": max(present) if low else min(present),
                            "lower_is_better": low, "counts": counts, "noise": noise,
                            "intervals": [list(wilson_interval(v, n)) if v is not None and n is not None
                                          else None for v, n in zip(values, counts)]}
        table[model] = rows
    return {"labels": list(labels), "models": table}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def compare_markdown(comparison: dict[str, Any]) -> str:
    """One markdown table per model: a row per metric, a column per report, then the mean and the worst."""
    labels = comparison["labels"]
    parts = []
    for model, rows in comparison["models"].items():
        if not rows:
            continue
        parts.append(f"### {model}\n")
        parts.append("| metric | " + " | ".join(labels) + " | mean | worst | ±95% |")
        parts.append("|---|" + "---|" * (len(labels) + 3))
        for metric, row in rows.items():
            cells = ["—" if v is None else f"{v:.3f}" for v in row["values"]]
            name = metric + (" (lower is better)" if row["lower_is_better"] else "")
            noise = "—" if row.get("noise") is None else f"{row['noise']:.2f}"
            parts.append(f"| {name} | " + " | ".join(cells) + f" | {row['mean']:.3f} | {row['worst']:.3f} | {noise} |")
        parts.append("")
    if parts:
        parts.append("±95%: half the 95% Wilson interval of the mean rate on that many eval items, the sampling "
                     "noise of the eval set alone; compare.json has each value's interval.\n")
    return "\n".join(parts)


def compare_cli(cfg: CompareConfig) -> int:
    """`chatsmith eval compare`: write OUT/compare.md, compare.json and safety.png; print the tables."""
    from chatsmith.eval.plots import safety_from_reports

    if not cfg.reports:
        raise ChatsmithError("eval compare: give the reports to compare (report.json files or run directories)")
    paths = [find_report(p) for p in cfg.reports]
    if cfg.labels and len(cfg.labels) != len(paths):
        raise ChatsmithError(f"--labels: {len(cfg.labels)} labels for {len(paths)} reports; give one per report")
    labels = list(cfg.labels) or [_label(p) for p in paths]
    if len(set(labels)) != len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    reports = [_load(p) for p in paths]
    comparison = compare_reports(reports, labels, cfg.models, cfg.metrics)
    comparison["reports"] = [str(p) for p in paths]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = compare_markdown(comparison)
    atomic_write_text(out / "compare.md", markdown)
    atomic_write_text(out / "compare.json", json.dumps(comparison, indent=2) + "\n")
    if cfg.models:
        reports = [{**r, "models": {m: e for m, e in r["models"].items() if m in cfg.models}} for r in reports]
    points = safety_from_reports(reports, out / "safety.png", labels)
    print(markdown)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}" + (f", {out / 'safety.png'} ({points} points)"
                                                                    if points else ""))
    return 0
