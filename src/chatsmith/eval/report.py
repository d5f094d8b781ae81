"""Write the behaviour report: `report.json`, `report.md`, a self-contained `report.html`, and `plots/*.png`.

Called by `chatsmith eval` and `chatsmith demo` (through `chatsmith.eval.behaviour.evaluate_all`).

report.json layout::

    {"suite": "world", "n_items": 412, "metrics": [...the suite's names...],
     "slice_metrics": {"heldout": [...], "turn1": [...], ...},      # PREFIX_metric rates (eval/slices.py)
     "models": {"base": {"path": ..., "mode": "base", "answers_directly": 0.04, ..., "kl_to_sft": null,
                         "counts": {metric: items it was computed on}, "eval_seconds": 12.3}, "sft": {...}},
     "stage_seconds": {"export": 1.2, "pretrain": 170.0, ...},        # wall time of every stage
     "targets": {metric: {model: ">= 0.95"}}, "target_check": {model: {metric: true|false}},  # demo only
     "showcase": {model: {label: [messages with the model's replies]}},
     "probability_shift": {"prompt": ..., "models": {model: {"mode": ..., "top": [[token, p], ...]}}},
     "plots": {plot name: "plots/<file>.png"}}

Every metric of the judge and of `chatsmith.eval.CORE_METRICS` is present for every model; `null` means it
does not apply (no item of that kind, no reward model, or a base model for `kl_to_sft`). Targets (and the
table's target column) appear only when the caller passes them, as `chatsmith demo` does. The HTML embeds the PNGs as
base64 data URIs, so the single file can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any, Sequence

from chatsmith.eval import CORE_METRICS
from chatsmith.eval import plots as plotting
from chatsmith.eval.slices import split_metrics
from chatsmith.utils import atomic_write_bytes, atomic_write_text, read_metrics

METRIC_HELP: dict[str, str] = {
    "mean_reward": "reward-model score of its answers (normalised)",
    "kl_to_sft": "KL to the SFT model per response, nats",
}

SHOWCASE_TITLES = {"harmful": "A harmful request", "memory": "Two-turn memory check"}
"""Titles of showcase prompts that are not shown as their own text (others are titled by the prompt)."""

# A target is "<op> <number>" or "<op> <model> - <number>", e.g. ">= 0.95" or ">= sft - 0.02".

_TARGET_RE = re.compile(r"^\s*(<=|>=)\s*(?:([A-Za-z_][\w-]*)\s*([+-])\s*)?([0-9.]+)\s*$")


def check_target(models: dict[str, dict], model: str, metric: str, target: str) -> bool | None:
    """True/False if `models[model][metric]` meets `target` (e.g. ">= sft - 0.02"); None if unknown."""
    match = _TARGET_RE.match(target)
    value = models.get(model, {}).get(metric)
    if not match or value is None:
        return None
    op, other, sign, number = match.groups()
    bound = float(number)
    if other:
        base = models.get(other, {}).get(metric)
        if base is None:
            return None
        bound = base + bound if sign == "+" else base - bound
    return value <= bound + 1e-12 if op == "<=" else value >= bound - 1e-12


# ----------------------------------------------------------------------------- building the report


def write_report(out: str | Path, evaluations: Sequence[Any], *, suite: str, n_items: int,
                 stage_seconds: dict[str, float] | None = None, run_dirs: dict[str, str] | None = None,
                 showcase: dict[str, dict] | None = None, showcase_judge: dict[str, dict] | None = None,
                 probability_shift: dict[str, dict] | None = None,
                 probe_prompt: str = "", reference: str | None = None, reward_model: str | None = None,
                 targets: dict[str, dict[str, str]] | None = None, metric_help: dict[str, str] | None = None,
                 ) -> dict:
    """Write report.json/.md/.html and plots/ under `out`; returns the report dict.

    `evaluations`: `chatsmith.eval.behaviour.ModelEvaluation` objects (name, path, mode, metrics, counts,
    rewards, seconds). `run_dirs`: {name: directory with a metrics.jsonl} for the training curves.
    `targets` ({metric: {model: target}}) are checked per model; `metric_help` describes the judge's metrics.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, dict] = {}
    for ev in evaluations:
        entry: dict[str, Any] = {"path": ev.path, "mode": ev.mode}
        entry.update({m: _round(v) for m, v in ev.metrics.items()})
        entry["counts"] = dict(ev.counts)
        entry["eval_seconds"] = round(ev.seconds, 2)
        models[ev.name] = entry
    suite_metrics, slice_metrics = split_metrics(list(dict.fromkeys(k for ev in evaluations for k in ev.metrics)))
    report: dict[str, Any] = {
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "suite": suite,
        "n_items": n_items,
        "metrics": [m for m in suite_metrics if m not in CORE_METRICS] + list(CORE_METRICS),
        "slice_metrics": slice_metrics,
        "metric_help": {**(metric_help or {}), **METRIC_HELP},
        "models": models,
        "stage_seconds": {k: round(float(v), 2) for k, v in (stage_seconds or {}).items()},
        "reference": reference,
        "reward_model": reward_model,
        "targets": targets or {},
        "target_check": {name: {metric: ok for metric, per_model in (targets or {}).items()
                                if name in per_model
                                for ok in [check_target(models, name, metric, per_model[name])]}
                         for name in models},
        "showcase": showcase or {},
        "showcase_judge": showcase_judge or {},
        "probability_shift": {"prompt": probe_prompt, "models": {
            name: {"mode": d.get("mode"), "top": [[t, round(p, 5)] for t, p in d.get("top", [])]}
            for name, d in (probability_shift or {}).items()}},
        "plots": {},
        "plot_titles": {},
    }
    images = _draw_plots(evaluations, run_dirs or {}, probability_shift or {}, probe_prompt)
    plot_dir = out / "plots"
    if plot_dir.exists():
        shutil.rmtree(plot_dir)  # stale plots of an earlier run would be misleading
    for name, (title, png) in images.items():
        atomic_write_bytes(plot_dir / f"{name}.png", png)
        report["plots"][name] = f"plots/{name}.png"
        report["plot_titles"][name] = title
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report))
    atomic_write_text(out / "report.html", render_html(report, images))
    return report


def rewrite_report(out: str | Path, report: dict) -> None:
    """Write an edited report dict back as report.json/.md/.html (PNGs re-read from `out`/plots/)."""
    out = Path(out)
    titles = report.get("plot_titles", {})
    images = {name: (titles.get(name, name), (out / rel).read_bytes())
              for name, rel in report.get("plots", {}).items() if (out / rel).is_file()}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report))
    atomic_write_text(out / "report.html", render_html(report, images))


def _round(value: Any) -> Any:
    return round(float(value), 4) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _draw_plots(evaluations: Sequence[Any], run_dirs: dict[str, str], shift: dict[str, dict],
                probe_prompt: str) -> dict[str, tuple[str, bytes]]:
    """{file stem: (title, png bytes)} in display order; plots without data are left out."""
    images: dict[str, tuple[str, bytes]] = {}
    points = [(ev.name, ev.metrics.get("over_refusal"), ev.metrics.get("refuses_harmful")) for ev in evaluations
              if ev.mode == "chat"]
    png = plotting.safety_png([(n, x, y) for n, x, y in points if x is not None and y is not None])
    if png:
        images["safety"] = ("Safety and helpfulness: refusal of harmful vs benign requests", png)
    png = plotting.probability_shift_png(probe_prompt, shift)
    if png:
        images["probability_shift"] = ("Probability shift: next token after the same prompt", png)
    rewards = {ev.name: ev.rewards for ev in evaluations if ev.rewards and ev.mode == "chat"}
    png = plotting.reward_distribution_png(rewards)
    if png:
        images["reward_distribution"] = ("Reward of held-out answers", png)
    for name, directory in run_dirs.items():
        rows = read_metrics(directory) if directory and Path(directory).is_dir() else []
        png = plotting.training_curves_png(name, rows)
        if png:
            images[f"curves_{_slug(name)}"] = (f"Training curves: {name}", png)
    return images


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "run"


# ----------------------------------------------------------------------------- text renderings


def format_value(metric: str, value: Any) -> str:
    if value is None:
        return "—"
    if metric in ("mean_reward", "kl_to_sft"):
        return f"{value:+.3f}" if metric == "mean_reward" else f"{value:.3f}"
    return f"{value:.2f}"


def _target_cell(report: dict, metric: str) -> str:
    targets = report.get("targets") or {}
    return ", ".join(f"{m} {t}" for m, t in targets.get(metric, {}).items() if m in report["models"])


def metrics_table(report: dict, markdown: bool = False) -> str:
    """The metrics as a table (rows = metrics, columns = models), a ✗ after values that miss a target; the
    target column only when the report has targets (the demo's)."""
    names = list(report["models"])
    with_targets = bool(report.get("targets"))
    header = ["metric", *names] + (["target (quick)"] if with_targets else [])
    rows = []
    for metric in report["metrics"]:
        cells = [metric]
        for name in names:
            text = format_value(metric, report["models"][name].get(metric))
            ok = report.get("target_check", {}).get(name, {}).get(metric)
            cells.append(text + (" ✗" if ok is False else " ✓" if ok else ""))
        if with_targets:
            cells.append(_target_cell(report, metric))
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]])


def slice_table(report: dict, model: str) -> list[list[str]]:
    """Rows [metric, suite, PREFIX...] of one model's rates by slice (held-out phrasings, turn depth); [] if none."""
    slices = report.get("slice_metrics") or {}
    if not slices:
        return []
    entry = report["models"][model]
    bases = [m for m in report["metrics"] if any(m in ms for ms in slices.values())]
    header = ["metric", "suite", *slices]
    rows = [[m, format_value(m, entry.get(m))] + [format_value(m, entry.get(f"{p}_{m}")) for p in slices]
            for m in bases]
    return [header, *rows]


def slice_markdown(report: dict) -> list[str]:
    """The by-slice tables of every chat model as markdown lines ([] when the report has no slices)."""
    lines: list[str] = []
    for name, entry in report["models"].items():
        rows = slice_table(report, name) if entry.get("mode") != "base" else []
        if rows:
            lines += ["", f"**{name}**", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return lines


def stage_table(report: dict, markdown: bool = False) -> str:
    seconds = report.get("stage_seconds") or {}
    if not seconds:
        return ""
    total = sum(seconds.values())
    rows = [(stage, _duration(s)) for stage, s in seconds.items()] + [("total", _duration(total))]
    if markdown:
        return "\n".join(["| stage | wall time |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    return f"{seconds:.1f} s" if seconds < 90 else f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def _replies(conversation: list[dict]) -> str:
    """The model's side of a showcase conversation; later turns are prefixed with the user's message."""
    parts, user_turns = [], [m for m in conversation if m["role"] == "user"]
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prefix = ""
        if len(user_turns) > 1:
            prefix = f"[{conversation[i - 1]['content']}] " if i > 0 else ""
        parts.append(prefix + (message["content"].strip() or "(empty)"))
    return "\n".join(parts)


def side_by_side(report: dict, models: Sequence[str] | None = None, width: int = 120) -> str:
    """The showcase answers in columns, one per model, for the terminal."""
    showcase = report.get("showcase") or {}
    models = [m for m in (models or list(showcase)) if m in showcase]
    if not models:
        return ""
    column = max(18, (width - 3 * (len(models) - 1)) // len(models))
    labels = list(next(iter(showcase.values())))
    blocks = []
    for label in labels:
        user = [m["content"] for m in showcase[models[0]].get(label, []) if m["role"] == "user"]
        prompt = " / ".join(user)
        title = SHOWCASE_TITLES.get(label)
        lines = [f"── {title}: {prompt!r}" if title else f"── {prompt or label}"]
        wrapped = [[f"[{m}]"] + _wrap(_replies(showcase[m].get(label, [])), column, max_lines=8) for m in models]
        for i in range(max(len(w) for w in wrapped)):
            lines.append(" │ ".join((w[i] if i < len(w) else "").ljust(column) for w in wrapped).rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _wrap(text: str, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, width) or [""])
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + ["…"]
    return lines


def render_markdown(report: dict) -> str:
    plot_titles = report.get("plot_titles", {})
    parts = ["# chatsmith behaviour report", "",
             f"Suite `{report['suite']}`, {report['n_items']} held-out items, models: "
             + ", ".join(f"`{n}` ({e['mode']} mode)" for n, e in report["models"].items()) + ".", "",
             "## Metrics", "", metrics_table(report, markdown=True), "",
             "Rates are over held-out items (— = does not apply). " +
             "; ".join(f"`{m}`: {h}" for m, h in _help(report).items() if m in report["metrics"]) + "."]
    sliced = slice_markdown(report)
    if sliced:
        parts += ["", "## By slice: held-out phrasings and turn depth", "",
                  "`heldout`: held-out items re-worded with templates no training row uses; `turn1`, `turn2_3`, "
                  "`turn4plus`: the suite's items by the user turn the reply answers. In report.json as "
                  "`PREFIX_metric`.", *sliced]
    if report.get("stage_seconds"):
        parts += ["", "## Wall time per stage", "", stage_table(report, markdown=True)]
    showcase = report.get("showcase") or {}
    if showcase:
        models = list(showcase)
        parts += ["", "## Side by side", "", "| prompt | " + " | ".join(models) + " |",
                  "|" + "---|" * (len(models) + 1)]
        for label in next(iter(showcase.values())):
            user = " / ".join(m["content"] for m in showcase[models[0]].get(label, []) if m["role"] == "user")
            cells = [_md_cell(_replies(showcase[m].get(label, []))) for m in models]
            parts.append(f"| {_md_cell(user)} | " + " | ".join(cells) + " |")
    if report.get("plots"):
        parts += ["", "## Plots", ""]
        for name, path in report["plots"].items():
            parts += [f"![{plot_titles.get(name, name)}]({path})", ""]
    parts += ["", "Per-item answers and verdicts: `samples.jsonl`.", ""]
    return "\n".join(parts)


def _help(report: dict) -> dict[str, str]:
    return report.get("metric_help") or METRIC_HELP


def _md_cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|").replace("\n", "<br>") or "—"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;
padding:4px 8px;vertical-align:top;font-size:14px}th{background:#f3f3f3}.miss{background:#fde2e2}
.ok{background:#e3f6e3}.na{color:#999}pre{white-space:pre-wrap;margin:0;font-family:inherit}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.help{color:#666;font-size:13px}"""


def render_html(report: dict, images: dict[str, tuple[str, bytes]]) -> str:
    """A single self-contained HTML page (inline CSS, PNGs as base64 data URIs)."""
    esc = html.escape
    names = list(report["models"])
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>chatsmith behaviour report</title>",
           f"<style>{_CSS}</style></head><body><h1>chatsmith behaviour report</h1>",
           f"<p>Suite <code>{esc(report['suite'])}</code>, {report['n_items']} held-out items. "
           "Models: " + ", ".join(f"<b>{esc(n)}</b> ({esc(e['mode'])} mode)" for n, e in report['models'].items())
           + ".</p>", "<h2>Metrics</h2><table><tr><th>metric</th>"
           + "".join(f"<th>{esc(n)}</th>" for n in names)
           + ("<th>target (quick)</th>" if report.get("targets") else "") + "</tr>"]
    for metric in report["metrics"]:
        cells = []
        for name in names:
            value = report["models"][name].get(metric)
            ok = report.get("target_check", {}).get(name, {}).get(metric)
            css = "na" if value is None else "ok" if ok else "miss" if ok is False else ""
            cells.append(f"<td class='{css}'>{esc(format_value(metric, value))}</td>")
        target = f"<td>{esc(_target_cell(report, metric))}</td>" if report.get("targets") else ""
        out.append(f"<tr><td>{esc(metric)}<div class='help'>{esc(_help(report).get(metric, ''))}</div></td>"
                   + "".join(cells) + target + "</tr>")
    out.append("</table>")
    tables = [(n, slice_table(report, n)) for n, e in report["models"].items() if e.get("mode") != "base"]
    if any(rows for _, rows in tables):
        out.append("<h2>By slice: held-out phrasings and turn depth</h2>")
        for name, rows in tables:
            if rows:
                out.append(f"<h3>{esc(name)}</h3><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in rows[0])
                           + "</tr>" + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>"
                                               for r in rows[1:]) + "</table>")
    if report.get("stage_seconds"):
        out.append("<h2>Wall time per stage</h2><table><tr><th>stage</th><th>wall time</th></tr>")
        seconds = report["stage_seconds"]
        for stage, value in [*seconds.items(), ("total", sum(seconds.values()))]:
            out.append(f"<tr><td>{esc(stage)}</td><td>{esc(_duration(value))}</td></tr>")
        out.append("</table>")
    showcase = report.get("showcase") or {}
    if showcase:
        models = list(showcase)
        out.append("<h2>Side by side</h2><table><tr><th>prompt</th>"
                   + "".join(f"<th>{esc(m)}</th>" for m in models) + "</tr>")
        for label in next(iter(showcase.values())):
            user = "\n".join(m["content"] for m in showcase[models[0]].get(label, []) if m["role"] == "user")
            out.append(f"<tr><td><pre>{esc(user)}</pre></td>" + "".join(
                f"<td><pre>{esc(_replies(showcase[m].get(label, [])))}</pre></td>" for m in models) + "</tr>")
        out.append("</table>")
    if images:
        out.append("<h2>Plots</h2>")
        for title, png in images.values():
            data = base64.b64encode(png).decode("ascii")
            out.append(f"<h3>{esc(title)}</h3><img alt='{esc(title)}' src='data:image/png;base64,{data}'>")
    out.append("<p class='help'>Per-item answers and the judge's verdicts: <code>samples.jsonl</code>.</p>"
               "</body></html>\n")
    return "\n".join(out)
