"""Rates by slice and by turn depth (`chatsmith.eval.slices`), their report tables, and the safety/helpfulness
scatter of several reports (`chatsmith.eval.plots.safety_from_reports`).

Run: python -m pytest tests/test_slices.py -q
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from chatsmith.eval import plots
from chatsmith.eval import report as R
from chatsmith.eval.behaviour import ModelEvaluation
from chatsmith.eval.slices import depth_bucket, sliced_aggregate, split_metrics, user_turns


@dataclass
class Item:
    id: str
    category: str
    messages: list
    expected: dict = field(default_factory=dict)


def chat(user_turns_: int) -> list[dict]:
    msgs: list[dict] = []
    for k in range(user_turns_):
        msgs.append({"role": "user", "content": f"question {k}"})
        if k < user_turns_ - 1:
            msgs.append({"role": "assistant", "content": f"answer {k}"})
    return msgs


SPECS = {"rude": ("rude", None), "refuses_harmful": ("refuses", ("harmful",)), "memory": ("memory", ("memory",))}


def test_rates_by_depth_and_slice_on_a_hand_made_example():
    system = [{"role": "system", "content": "Be brief."}]
    rows = [  # (item, verdict)
        (Item("a", "harmful", system + chat(1)), {"rude": False, "refuses": True}),
        (Item("b", "harmful", chat(1)), {"rude": True, "refuses": False}),
        (Item("c", "memory", chat(2)), {"rude": False, "memory": True}),
        (Item("d", "harmful", chat(3)), {"rude": False, "refuses": True}),
        (Item("e", "memory", chat(4)), {"rude": True, "memory": False}),
        (Item("f", "memory", chat(7)), {"rude": False, "memory": True}),
        (Item("g", "harmful", chat(1), {"slice": "heldout"}), {"rude": True, "refuses": False}),
        (Item("h", "harmful", chat(5), {"slice": "heldout"}), {"rude": True, "refuses": True}),
    ]
    assert [user_turns(i.messages) for i, _ in rows] == [1, 1, 2, 3, 4, 7, 1, 5]
    assert [depth_bucket(i.messages) for i, _ in rows[:6]] == ["turn1", "turn1", "turn2_3", "turn2_3",
                                                               "turn4plus", "turn4plus"]
    rates, counts = sliced_aggregate([i for i, _ in rows], [v for _, v in rows], SPECS)
    # the suite: the six untagged items
    assert rates["rude"] == pytest.approx(2 / 6) and counts["rude"] == 6
    assert rates["refuses_harmful"] == pytest.approx(2 / 3) and rates["memory"] == pytest.approx(2 / 3)
    # the held-out slice: its two items only, depth ignored
    assert rates["heldout_rude"] == 1.0 and rates["heldout_refuses_harmful"] == 0.5
    assert rates["heldout_memory"] is None and counts["heldout_memory"] == 0
    # depth buckets of the untagged items
    assert rates["turn1_rude"] == 0.5 and rates["turn1_refuses_harmful"] == 0.5 and rates["turn1_memory"] is None
    assert rates["turn2_3_rude"] == 0.0 and rates["turn2_3_memory"] == 1.0 and rates["turn2_3_refuses_harmful"] == 1.0
    assert rates["turn4plus_rude"] == 0.5 and rates["turn4plus_memory"] == 0.5 and counts["turn4plus_memory"] == 2


def test_a_single_turn_suite_has_no_depth_rates_and_old_names_stay():
    rows = [(Item(str(k), "harmful", chat(1)), {"rude": k == 0, "refuses": k > 0}) for k in range(3)]
    rates, _ = sliced_aggregate([i for i, _ in rows], [v for _, v in rows], SPECS)
    assert set(rates) == set(SPECS) and rates["refuses_harmful"] == pytest.approx(2 / 3)


def test_split_metrics_separates_prefixed_rates():
    names = ["answers_directly", "over_refusal", "rude", "heldout_rude", "heldout_over_refusal",
             "turn1_rude", "turn2_3_rude", "turn4plus_over_refusal", "mean_reward"]
    base, prefixed = split_metrics(names)
    assert base == ["answers_directly", "over_refusal", "rude", "mean_reward"]
    assert prefixed == {"heldout": ["rude", "over_refusal"], "turn1": ["rude"], "turn2_3": ["rude"],
                        "turn4plus": ["over_refusal"]}


def _evaluation(name: str, mode: str, harmful: float, benign: float) -> ModelEvaluation:
    metrics = {"rude": 0.1, "refuses_harmful": harmful, "over_refusal": benign, "heldout_rude": 0.2,
               "heldout_refuses_harmful": harmful - 0.1, "turn1_rude": 0.0, "turn4plus_rude": 0.3,
               "mean_reward": None, "kl_to_sft": None}
    return ModelEvaluation(name, f"/runs/{name}", mode, metrics, {m: 10 for m in metrics})


def test_report_shows_slices_in_their_own_table_and_draws_the_safety_plot(tmp_path):
    evaluations = [_evaluation("base", "base", 0.0, 0.0), _evaluation("sft", "chat", 0.5, 0.2),
                   _evaluation("ppo", "chat", 0.95, 0.1)]
    report = R.write_report(tmp_path, evaluations, suite="world", n_items=10)
    assert "heldout_rude" not in report["metrics"] and "rude" in report["metrics"]
    assert report["slice_metrics"]["heldout"] == ["rude", "refuses_harmful"]
    assert report["models"]["ppo"]["turn4plus_rude"] == 0.3            # every rate stays in report.json
    markdown = (tmp_path / "report.md").read_text()
    assert "## By slice" in markdown and "| metric | suite | heldout | turn1 | turn4plus |" in markdown
    assert "| rude | 0.10 | 0.20 | 0.00 | 0.30 |" in markdown
    assert "By slice" in (tmp_path / "report.html").read_text()
    assert (tmp_path / report["plots"]["safety"]).read_bytes().startswith(b"\x89PNG")


def test_safety_plot_of_several_reports_has_one_point_per_model_and_report(tmp_path, monkeypatch):
    paths = []
    for seed in range(2):
        entry = {"sft": {"mode": "chat", "refuses_harmful": 0.5 + seed / 10, "over_refusal": 0.2},
                 "ppo": {"mode": "chat", "refuses_harmful": 0.9, "over_refusal": 0.1 * seed},
                 "base": {"mode": "base", "refuses_harmful": 0.0, "over_refusal": 0.0},
                 "dpo": {"mode": "chat", "refuses_harmful": None, "over_refusal": 0.3}}
        path = tmp_path / f"seed{seed}" / "report.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"models": entry}))
        paths.append(path)
    points = plots.safety_points(paths)
    assert points == [("sft (seed0)", 0.2, 0.5), ("ppo (seed0)", 0.0, 0.9), ("sft (seed1)", 0.2, 0.6),
                      ("ppo (seed1)", 0.1, 0.9)]
    drawn = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter",
                        lambda self, x, y, *a, **k: drawn.append((list(x), list(y))) or original(self, x, y, *a, **k))
    out = tmp_path / "safety.png"
    assert plots.safety_from_reports(paths, out) == 4
    assert out.read_bytes().startswith(b"\x89PNG")
    assert sorted(drawn) == sorted(([x], [y]) for _, x, y in points)   # one marker per model and report
    assert plots.safety_png([]) is None


def test_max_items_caps_each_category_and_slice_apart(tmp_path):
    from chatsmith.eval.behaviour import load_suite

    rows = {"heldout_harmful.jsonl": {"slice": "heldout"}, "harmful.jsonl": {}}
    for name, expected in rows.items():
        (tmp_path / name).write_text("".join(
            json.dumps({"id": f"{name}-{k}", "category": "harmful", "messages": chat(1), "expected": expected}) + "\n"
            for k in range(3)))
    items = load_suite(str(tmp_path), max_items=2)
    assert sorted(i.id for i in items) == ["harmful.jsonl-0", "harmful.jsonl-1", "heldout_harmful.jsonl-0",
                                           "heldout_harmful.jsonl-1"]
