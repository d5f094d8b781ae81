"""The report's plots, drawn with matplotlib's Agg backend (no screen needed) and returned as PNG bytes.

- `training_curves_png(name, rows)`: one stage's `metrics.jsonl` rows — loss (and eval loss, accuracy);
  for PPO also the reward-model score, the KL to the reference and the KL coefficient beta.
- `reward_distribution_png(rewards)`: histograms of reward-model scores of each model's answers
  (SFT vs PPO is the interesting pair: RLHF should move the mass to the right).
- `probability_shift_png(prompt, distributions)`: the lesson's "probability shift" — the top-k next
  tokens of a base model and of its chat versions after the same prompt, as horizontal bars.

- `safety_png(points)`: refusal of harmful requests (y) against refusal of benign ones (x), one point per
  model; `safety_from_reports(reports, out)` draws it for several `report.json` files (one point per model
  and report, e.g. per seed) and writes the PNG.

Used by `chatsmith.eval.report`; each function returns None when it has nothing to draw.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

# Which metrics.jsonl keys make up each panel (first key found wins the panel title); a run gets one
# panel per group that has data. Key names follow the stages' MetricsLogger rows.
CURVE_PANELS: list[tuple[str, tuple[str, ...]]] = [
    ("loss", ("loss", "eval_loss", "policy_loss", "value_loss")),
    ("accuracy", ("accuracy", "eval_accuracy", "reward_accuracy", "eval_pair_accuracy")),
    ("reward", ("score", "mean_score", "reward", "rm_score", "mean_reward")),
    ("KL to reference", ("kl", "mean_kl", "kl_ref")),
    ("β (KL coefficient)", ("beta", "kl_coef", "kl_coefficient")),
]

_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _to_png(fig: Any) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # a token's glyph missing from the font is drawn as a box; no warning
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _series(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(float(row.get("step", len(xs))))
            ys.append(float(value))
    return xs, ys


def curve_panels(rows: Sequence[dict]) -> list[tuple[str, list[str]]]:
    """The panels a run's metrics rows can fill: [(title, [keys with data])]."""
    panels = []
    for title, keys in CURVE_PANELS:
        present = [k for k in keys if _series(rows, k)[1]]
        if present:
            panels.append((title, present))
    return panels


def training_curves_png(name: str, rows: Sequence[dict]) -> bytes | None:
    """One row of panels for one stage (x = optimizer step)."""
    panels = curve_panels(rows)
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 2.8), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for color, key in zip(_COLORS, keys):
            xs, ys = _series(rows, key)
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, color=color, label=key, linewidth=1.4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{name}: training curves", fontsize=11)
    fig.tight_layout()
    return _to_png(fig)


def reward_distribution_png(rewards: dict[str, Sequence[float]]) -> bytes | None:
    """Overlaid histograms of normalised reward-model scores, one per model, with its mean marked."""
    rewards = {name: [float(r) for r in values] for name, values in rewards.items() if values}
    if not rewards:
        return None
    plt = _pyplot()
    low = min(min(v) for v in rewards.values())
    high = max(max(v) for v in rewards.values())
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    bins = [low + (high - low) * i / 24 for i in range(25)]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for color, (name, values) in zip(_COLORS, rewards.items()):
        mean = sum(values) / len(values)
        ax.hist(values, bins=bins, alpha=0.45, color=color, label=f"{name} (mean {mean:+.2f})")
        ax.axvline(mean, color=color, linestyle="--", linewidth=1.2)
    ax.set_xlabel("reward (normalised: mean 0, std 1 on SFT samples)", fontsize=9)
    ax.set_ylabel("answers", fontsize=9)
    ax.set_title("Reward of held-out answers", fontsize=11)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _to_png(fig)


def _token_label(text: str) -> str:
    """Make whitespace and control tokens visible on an axis (' Paris' -> '␣Paris', '\\n' -> '\\\\n')."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣")
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    return shown if shown else "∅"


def probability_shift_png(prompt: str, distributions: dict[str, dict]) -> bytes | None:
    """Top-k next tokens after `prompt`, one panel per model.

    `distributions`: {model name: {"mode": "base"|"chat", "top": [(token text, probability), ...]}}.
    """
    distributions = {n: d for n, d in distributions.items() if d.get("top")}
    if not distributions:
        return None
    plt = _pyplot()
    n = len(distributions)
    k = max(len(d["top"]) for d in distributions.values())
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 0.32 * k + 1.6), squeeze=False)
    for i, (ax, (name, dist)) in enumerate(zip(axes[0], distributions.items())):
        tokens = [_token_label(t) for t, _ in dist["top"]][::-1]
        probs = [p for _, p in dist["top"]][::-1]
        ax.barh(range(len(tokens)), probs, color=_COLORS[i % len(_COLORS)])
        ax.set_yticks(range(len(tokens)))
        ax.set_yticklabels(tokens, fontsize=8, family="monospace")
        ax.set_xlim(0, max(1e-3, max(probs)) * 1.15)
        ax.set_xlabel("P(next token)", fontsize=9)
        how = "raw text" if dist.get("mode") == "base" else "chat template"
        ax.set_title(f"{name} ({how})", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Next token after {prompt!r}", fontsize=11)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
    return _to_png(fig)


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def safety_png(points: Sequence[tuple[str, float, float]], title: str = "Safety and helpfulness") -> bytes | None:
    """A scatter of (label, refusal of benign requests = over_refusal, refusal of harmful requests): the ideal
    model sits at the top left (refuses every harmful request, helps with every benign one)."""
    points = [(str(n), float(x), float(y)) for n, x, y in points if x is not None and y is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    ax.axhspan(0.9, 1.05, xmin=0, xmax=0.3 / 1.1, color="#55a868", alpha=0.08)
    groups = list(dict.fromkeys(n.split(" ")[0] for n, _, _ in points))   # "ppo (seed 1)" -> colour of "ppo"
    # many points (models x seeds): a legend names the models and each point carries only its tag ("seed 1")
    legend = len(points) > 6 and all(" (" in n for n, _, _ in points)
    labelled: set[str] = set()
    for name, x, y in points:
        group = name.split(" ")[0]
        g = groups.index(group)
        label = group if legend and group not in labelled else None
        labelled.add(group)
        ax.scatter([x], [y], s=60, color=_COLORS[g % len(_COLORS)], marker=_MARKERS[g % len(_MARKERS)], zorder=3,
                   label=label)
        tag = name.split(" (", 1)[1].rstrip(")") if legend else name
        ax.annotate(tag, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7 if legend else 8)
    if legend:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("refusal of benign requests (over_refusal, lower is better)", fontsize=9)
    ax.set_ylabel("refusal of harmful requests (higher is better)", fontsize=9)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _to_png(fig)


def safety_points(reports: Sequence[dict | str | Path], labels: Sequence[str] | None = None
                  ) -> list[tuple[str, float, float]]:
    """(label, over_refusal, refuses_harmful) of every chat model of every report (a dict or a report.json
    path); with several reports a point is labelled "model (LABEL)", LABEL from `labels` or the file's folder."""
    out = []
    for k, report in enumerate(reports):
        tag = labels[k] if labels else None
        if not isinstance(report, dict):
            path = Path(report)
            tag = tag or path.parent.name or path.stem
            report = json.loads(path.read_text(encoding="utf-8"))
        tag = tag or f"report {k + 1}"
        for name, entry in report.get("models", {}).items():
            x, y = entry.get("over_refusal"), entry.get("refuses_harmful")
            if entry.get("mode") != "base" and x is not None and y is not None:
                out.append((name if len(reports) == 1 else f"{name} ({tag})", x, y))
    return out


def safety_from_reports(reports: Sequence[dict | str | Path], out: str | Path,
                        labels: Sequence[str] | None = None) -> int:
    """Write the safety/helpfulness scatter of several reports (e.g. one per seed) to `out` (a .png path);
    returns the number of points (0: nothing written)."""
    from chatsmith.utils import atomic_write_bytes

    points = safety_points(reports, labels)
    png = safety_png(points)
    if png:
        atomic_write_bytes(Path(out), png)
    return len(points) if png else 0
