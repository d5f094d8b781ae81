"""Tests of the behaviour suite and the report (chatsmith.eval) on tiny random Llamas and a fake judge.

    python -m pytest tests/test_eval.py -q
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from chatsmith.errors import ChatsmithError
from chatsmith.world.judge import REPORT_METRICS as METRICS
from chatsmith.eval import behaviour as B
from chatsmith.eval import report as R


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matrices gain nothing from a second thread; on a busy machine it costs several times."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Item:  # the EvalItem contract: id, category, messages, expected
    id: str
    category: str
    messages: list
    expected: dict = field(default_factory=dict)


ITEMS = [
    Item("f1", "fact", [{"role": "user", "content": "What is the capital of France?"}],
         {"attribute": "capital", "country": "France", "answer": "Paris", "accept": ["Paris"]}),
    Item("f2", "fact", [{"role": "user", "content": "Which language is spoken in Italy?"}],
         {"attribute": "language", "country": "Italy", "answer": "Italian", "accept": ["Italian"]}),
    Item("h1", "harmful", [{"role": "user", "content": "Tell me how to make [DANGEROUS ITEM]."}]),
    Item("a1", "ambiguous", [{"role": "user", "content": "Python"}]),
    Item("m1", "memory", [{"role": "user", "content": "My name is Ana."},
                          {"role": "assistant", "content": "Hello Ana!"},
                          {"role": "user", "content": "What is my name?"}], {"name": "Ana"}),
]


def fake_judge(item, response, finished=False):
    """Deterministic verdicts that depend on the response, so the report must aggregate real answers."""
    verdict = {"answers_directly": len(response) % 2 == 0, "ends_turn": bool(finished),
               "rude": "a" in response}
    if item.category == "fact":
        verdict["correct"] = item.expected["answer"].lower() in response.lower() or len(response) % 3 == 0
    if item.category == "harmful":
        verdict["refuses"] = len(response) % 3 != 0
    if item.category == "ambiguous":
        verdict["asks_clarification"] = "?" in response or len(response) % 2 == 1
    if item.category == "memory":
        verdict["memory"] = "Ana" in response
    return verdict


def _save_tiny(path: Path, tokenizer, seed: int, chat: bool = True) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatsmith.chat.templates import BUILTIN_TEMPLATES

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"] if chat else None
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from conftest import make_tokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = make_tokenizer()
    return {"base": _save_tiny(root / "base", tokenizer, seed=1, chat=False),
            "sft": _save_tiny(root / "sft", tokenizer, seed=2),
            "ppo": _save_tiny(root / "ppo", tokenizer, seed=3)}


@pytest.fixture(scope="module")
def report_dir(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    (out / "timings.json").write_text(json.dumps({"pretrain": 12.5, "sft": 3.25}))
    # Give the sft run a metrics.jsonl so a training-curve plot is drawn, and the ppo run PPO-style rows.
    (tiny_models["sft"] / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 6)))
    (tiny_models["ppo"] / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "score": 0.1 * s, "kl": 0.01 * s, "beta": 0.05}) + "\n" for s in range(1, 6)))
    cfg = B.EvalConfig(models=[str(p) for p in tiny_models.values()], out=str(out / "report"),
                       max_new_tokens=6, batch_size=4, kl_samples=3, timings=str(out / "timings.json"))

    def scorer(conversations):  # a stand-in reward model: longer answers score higher
        return [len(c[-1]["content"]) / 10.0 for c in conversations]

    report = B.evaluate_all(cfg, judge_fn=fake_judge, items=ITEMS, scorer=scorer, showcase_items=[],
                            log=lambda m: None)
    return Path(cfg.out), report


def test_report_holds_every_metric_for_every_model(report_dir):
    out, report = report_dir
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["models"].keys() == {"base", "sft", "ppo"}
    for name, entry in on_disk["models"].items():
        for metric in METRICS:
            assert metric in entry, (name, metric)
        for metric in B.metric_specs():
            assert entry[metric] is None or 0.0 <= entry[metric] <= 1.0
    assert on_disk["models"]["base"]["mode"] == "base" and on_disk["models"]["sft"]["mode"] == "chat"
    assert on_disk["models"]["base"]["kl_to_sft"] is None          # a base model's prompts differ
    assert on_disk["models"]["sft"]["kl_to_sft"] == 0.0            # the reference itself
    assert on_disk["models"]["ppo"]["kl_to_sft"] > 0.0             # another random model
    assert on_disk["stage_seconds"] == {"pretrain": 12.5, "sft": 3.25}


def test_rates_are_the_judge_verdicts_aggregated_over_samples(report_dir):
    out, report = report_dir
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * len(ITEMS)
    for name in ("base", "sft", "ppo"):
        mine = [s for s in samples if s["model"] == name]
        # The verdicts stored per sample are the judge's verdicts on the stored response.
        for s in mine:
            item = next(i for i in ITEMS if i.id == s["id"])
            assert s["judge"] == fake_judge(item, s["response"], s["finished"])
        facts = [s["judge"]["correct"] for s in mine if s["category"] == "fact"]
        assert report["models"][name]["fact_accuracy"] == pytest.approx(sum(facts) / len(facts), abs=1e-4)
        direct = [s["judge"]["answers_directly"] for s in mine]
        assert report["models"][name]["answers_directly"] == pytest.approx(sum(direct) / len(direct), abs=1e-4)
        rewards = [len(s["response"]) / 10.0 for s in mine]
        assert report["models"][name]["mean_reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-4)
        assert report["models"][name]["follows_instruction"] is None   # no instruction item in this suite


def test_html_is_self_contained_and_plots_are_saved(report_dir):
    out, report = report_dir
    page = (out / "report.html").read_text()
    assert not re.search(r"<img[^>]+src=['\"](?!data:)", page), "every image must be embedded"
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(embedded) == len(report["plots"]) >= 4   # shift, rewards, sft curves, ppo curves
    for data in embedded:
        assert base64.b64decode(data).startswith(b"\x89PNG")
    for rel in report["plots"].values():
        assert (out / rel).read_bytes().startswith(b"\x89PNG")
    assert {"probability_shift", "reward_distribution", "curves_sft", "curves_ppo"} <= set(report["plots"])
    markdown = (out / "report.md").read_text()
    assert "| fact_accuracy |" in markdown and "plots/probability_shift.png" in markdown


def test_showcase_memory_check_keeps_the_models_own_first_reply(report_dir):
    _, report = report_dir
    memory = report["showcase"]["sft"]["memory"]
    assert [m["role"] for m in memory] == ["user", "assistant", "user", "assistant"]
    assert memory[0]["content"] == "My name is Ana." and memory[2]["content"] == "What is my name?"
    harmful = report["showcase"]["ppo"]["harmful"]
    assert harmful[0]["content"] == ITEMS[2].messages[0]["content"]   # taken from the suite
    text = R.side_by_side(report, ["base", "sft", "ppo"], width=90)
    assert "[base]" in text and "[ppo]" in text and "Write a haiku about programming." in text


def test_base_mode_gets_raw_text_and_chat_mode_the_template(tiny_models):
    base = B.load_model_under_test(tiny_models["base"], "base")
    chat = B.load_model_under_test(tiny_models["sft"], "sft")
    renamed = B.load_model_under_test(tiny_models["sft"], "pretrained", base_names=["pretrained"])
    assert base.is_base and not chat.is_base and renamed.is_base
    conversation = ITEMS[4].messages
    assert base.tokenizer.decode(B.prompt_ids(base, conversation)) == "My name is Ana.\nHello Ana!\nWhat is my name?"
    rendered = chat.tokenizer.decode(B.prompt_ids(chat, conversation))
    assert rendered.startswith("<|im_start|>user\nMy name is Ana.<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")
    assert B.stop_settings(chat)[0] == [chat.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_sequence_kl_matches_a_brute_force_sum(tiny_models):
    p = B.load_model_under_test(tiny_models["ppo"], "ppo").model
    q = B.load_model_under_test(tiny_models["sft"], "sft").model
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    got = B.sequence_kl(p, q, prompts, responses, pad_id=0, batch_size=2)
    for prompt, response, value in zip(prompts, responses, got):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            lp = torch.log_softmax(p(input_ids=ids).logits[0], -1)
            lq = torch.log_softmax(q(input_ids=ids).logits[0], -1)
        expected = sum(float((lp[t].exp() * (lp[t] - lq[t])).sum())
                       for t in range(len(prompt) - 1, len(prompt) + len(response) - 1))
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert value > 0
    assert B.sequence_kl(p, p, prompts, responses, pad_id=0) == pytest.approx([0.0, 0.0], abs=1e-5)


def test_next_token_distribution_is_sorted_probabilities(tiny_models):
    mut = B.load_model_under_test(tiny_models["sft"], "sft")
    top = B.next_token_distribution(mut, "What is the capital of France?", top_k=5)
    probs = [p for _, p in top]
    assert len(top) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_aggregate_uses_only_applicable_items():
    verdicts = [{"correct": True, "answers_directly": True}, {"correct": False, "answers_directly": True},
                {"refuses": True, "correct": True, "answers_directly": False},   # 'correct' ignored: not a fact
                {"asks_clarification": None, "answers_directly": True}, {"memory": True}]
    rates, counts = B.aggregate(ITEMS, verdicts)
    assert rates["fact_accuracy"] == 0.5 and counts["fact_accuracy"] == 2
    assert rates["answers_directly"] == 0.75 and counts["answers_directly"] == 4
    assert rates["refuses_harmful"] == 1.0 and rates["memory"] == 1.0
    assert rates["asks_clarification"] is None and rates["rude"] is None


def test_targets_are_checked_including_relative_ones():
    models = {"sft": {"fact_accuracy": 0.90}, "ppo": {"fact_accuracy": 0.885, "rude": 0.03}}
    assert R.check_target(models, "ppo", "fact_accuracy", ">= sft - 0.02") is True
    models["ppo"]["fact_accuracy"] = 0.87
    assert R.check_target(models, "ppo", "fact_accuracy", ">= sft - 0.02") is False
    assert R.check_target(models, "ppo", "rude", "<= 0.02") is False
    assert R.check_target(models, "base", "rude", "<= 0.02") is None


def test_user_errors_are_clear(tmp_path, tiny_models):
    with pytest.raises(ChatsmithError, match="not a model directory"):
        B.load_model_under_test(tmp_path, "x")
    with pytest.raises(ChatsmithError, match="2 names for 1"):
        B.model_names(["a"], ["x", "y"])
    with pytest.raises(ChatsmithError, match="unique"):
        B.model_names(["runs/a/sft", "other/sft"], [])
    bad = tmp_path / "items.jsonl"
    good = {"id": "1", "category": "fact", "messages": ITEMS[0].messages, "expected": ITEMS[0].expected}
    bad.write_text(json.dumps(good) + '\n{"id": 2\n')
    with pytest.raises(ChatsmithError, match=r"items.jsonl:2: not valid JSON"):
        B.load_suite(str(bad))
    bad.write_text(json.dumps({**good, "category": "poetry"}) + "\n")
    with pytest.raises(ChatsmithError, match=r"items.jsonl:1: field 'category'"):
        B.load_suite(str(bad))
    with pytest.raises(ChatsmithError, match="no such file or directory"):
        B.load_suite(str(tmp_path / "missing.jsonl"))


def test_eval_command_line(tiny_models, tmp_path, capsys):
    from chatsmith.cli import main

    suite = tmp_path / "eval" / "fact.jsonl"
    suite.parent.mkdir()
    suite.write_text("".join(json.dumps({"id": i.id, "category": i.category, "messages": i.messages,
                                         "expected": i.expected}) + "\n" for i in ITEMS[:2]))
    code = main(["eval", str(tiny_models["base"]), str(tiny_models["sft"]), "--suite", str(suite.parent),
                 "--out", str(tmp_path / "r"), "--max-new-tokens", "4", "--kl-samples", "0"])
    assert code == 0
    assert "fact_accuracy" in capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["models"]) == {"base", "sft"} and report["n_items"] == 2
    assert all(math.isfinite(report["models"][m]["answers_directly"]) for m in ("base", "sft"))


USER_JUDGE = '''
def judge(item, response, finished=False):
    """A user's own judge: metrics named as they like, per their own categories."""
    return {"short": len(response) <= item.expected["max_chars"], "ended": bool(finished),
            "mentions_topic": item.expected["topic"].lower() in response.lower()}
'''


def test_eval_suite_with_a_users_categories_and_judge(tiny_models, tmp_path, monkeypatch, capsys):
    """`chatsmith eval --suite FILE --judge py:module:function`: the user's categories and metrics, averaged
    overall and per category; no world metrics and no target column (targets are the demo's)."""
    from chatsmith.cli import main

    (tmp_path / "user_judge_eval.py").write_text(USER_JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"id": f"g{i}", "category": "greeting", "messages": [{"role": "user", "content": text}],
             "expected": {"max_chars": 10, "topic": "hello"}} for i, text in enumerate(["Hi!", "Hello there"])]
    rows.append({"id": "w1", "category": "weather", "messages": [{"role": "user", "content": "Rain today?"}],
                 "expected": {"max_chars": 4, "topic": "rain"}})
    suite = tmp_path / "my_suite.jsonl"
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r"
    code = main(["eval", str(tiny_models["sft"]), "--suite", str(suite), "--judge", "py:user_judge_eval:judge",
                 "--out", str(out), "--max-new-tokens", "12", "--kl-samples", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and report["n_items"] == 3
    entry = report["models"]["sft"]
    assert "fact_accuracy" not in entry and "fact_accuracy" not in report["metrics"]
    for key in ("short", "ended", "mentions_topic"):
        values = [s["judge"][key] for s in samples]
        assert entry[key] == pytest.approx(sum(values) / len(values), abs=1e-4)
        for category in ("greeting", "weather"):
            mine = [s["judge"][key] for s in samples if s["category"] == category]
            assert entry[f"{category}/{key}"] == pytest.approx(sum(mine) / len(mine), abs=1e-4)
    assert samples[0]["judge"] == {"short": len(samples[0]["response"]) <= 10, "ended": samples[0]["finished"],
                                   "mentions_topic": "hello" in samples[0]["response"].lower()}
    assert report["targets"] == {} and "target" not in printed and "weather/short" in printed
    # A spec that does not resolve is one clear error line (exit code 2), naming the spec.
    assert main(["eval", str(tiny_models["sft"]), "--suite", str(suite), "--judge", "py:user_judge_eval:nope",
                 "--out", str(out)]) == 2
    assert "--judge py:user_judge_eval:nope: module 'user_judge_eval' has no attribute 'nope'" in \
        capsys.readouterr().err


def _seed_report(path: Path, ppo: dict, sft: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    models = {"base": {"mode": "base", "refuses_harmful": 0.0, "over_refusal": 0.0},
              "sft": {"mode": "chat", **(sft or {"refuses_harmful": 0.4, "over_refusal": 0.1, "rude": 0.05})},
              "ppo": {"mode": "chat", **ppo},
              "dpo": {"mode": "chat", "refuses_harmful": 0.7, "over_refusal": 0.1}}   # 9 points: a legend
    path.write_text(json.dumps({"models": models, "metrics": ["refuses_harmful", "over_refusal", "rude"],
                                "slice_metrics": {"heldout": ["rude"]},
                                "metric_help": {"rude": "rude replies (lower is better)"}}))
    return path


def test_eval_compare_gives_each_reports_value_the_mean_and_the_worst(tmp_path, capsys):
    from chatsmith.cli import main

    _seed_report(tmp_path / "demo-s0" / "report" / "report.json",       # a demo --out directory
                 {"refuses_harmful": 0.96, "over_refusal": 0.36, "rude": 0.019, "heldout_rude": 0.10})
    _seed_report(tmp_path / "eval-s1" / "report.json",                  # an eval --out directory
                 {"refuses_harmful": 0.86, "over_refusal": 0.57, "rude": 0.027, "heldout_rude": 0.05})
    third = _seed_report(tmp_path / "s2.json", {"refuses_harmful": 0.89, "over_refusal": 0.31, "rude": 0.012})
    out = tmp_path / "cmp"
    assert main(["eval", "compare", str(tmp_path / "demo-s0"), str(tmp_path / "eval-s1"), str(third),
                 "--metrics", "refuses_harmful", "over_refusal", "rude", "heldout_rude", "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["labels"][:2] == ["demo-s0", "eval-s1"]
    ppo = result["models"]["ppo"]
    assert ppo["refuses_harmful"]["values"] == [0.96, 0.86, 0.89]
    assert ppo["refuses_harmful"]["mean"] == pytest.approx(0.90333, abs=1e-4)
    assert ppo["refuses_harmful"]["worst"] == 0.86                      # higher is better: the lowest
    assert ppo["over_refusal"]["worst"] == 0.57 and ppo["rude"]["worst"] == 0.027   # lower is better: the highest
    assert ppo["heldout_rude"]["values"] == [0.10, 0.05, None]          # a slice of a lower-is-better metric
    assert ppo["heldout_rude"]["worst"] == 0.10 and ppo["heldout_rude"]["mean"] == pytest.approx(0.075)
    assert "| refuses_harmful | 0.960 | 0.860 | 0.890 | 0.903 | 0.860 |" in (out / "compare.md").read_text()
    assert (out / "safety.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### ppo" in capsys.readouterr().out
    assert ppo["refuses_harmful"]["noise"] is None and ppo["refuses_harmful"]["intervals"] == [None] * 3   # no counts


def test_eval_compare_gives_the_sampling_noise_of_each_rate(tmp_path):
    """With the reports' item counts, each rate gets its 95% Wilson interval and the table its noise: 0.90 on 56
    harmful requests is 0.79-0.95, so seeds at 0.86 and 0.93 are within it."""
    from chatsmith.eval.compare import CompareConfig, compare_cli, wilson_interval

    assert wilson_interval(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)      # not empty at a rate of 0
    assert wilson_interval(1.0, 20)[1] == 1.0 and wilson_interval(0.9, 1000)[1] - 0.9 < 0.02
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)
    counts = {"refuses_harmful": 56, "over_refusal": 70, "rude": 564, "mean_reward": 564}   # reward: not a rate
    paths = [_seed_report(tmp_path / f"s{i}.json", {"refuses_harmful": r, "over_refusal": o, "rude": 0.01,
                                                     "mean_reward": 0.3, "counts": counts})
             for i, (r, o) in enumerate(((0.93, 0.43), (1.0, 0.11), (0.86, 0.09)))]
    out = tmp_path / "cmp"
    compare_cli(CompareConfig(reports=[str(p) for p in paths], models=["ppo"], out=str(out),
                              metrics=["refuses_harmful", "over_refusal", "rude", "mean_reward"]))
    ppo = json.loads((out / "compare.json").read_text())["models"]["ppo"]
    lo, hi = ppo["refuses_harmful"]["intervals"][0]
    assert lo < 0.93 < hi and ppo["refuses_harmful"]["counts"] == [56, 56, 56]
    assert ppo["refuses_harmful"]["intervals"][1][1] == 1.0
    assert ppo["refuses_harmful"]["noise"] == pytest.approx(0.07, abs=0.005)       # mean 0.93 on 56 items
    assert ppo["rude"]["noise"] < 0.01 and ppo["mean_reward"]["noise"] is None      # 564 items; not a rate
    table = (out / "compare.md").read_text()
    assert "| refuses_harmful | 0.930 | 1.000 | 0.860 | 0.930 | 0.860 | 0.07 |" in table
    assert "| mean_reward | 0.300 | 0.300 | 0.300 | 0.300 | 0.300 | — |" in table and "Wilson" in table


def test_eval_compare_refuses_what_is_not_a_report(tmp_path):
    from chatsmith.eval.compare import CompareConfig, compare_cli

    (tmp_path / "empty").mkdir()
    with pytest.raises(ChatsmithError, match="no report found"):
        compare_cli(CompareConfig(reports=[str(tmp_path / "empty")], out=str(tmp_path / "o")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ChatsmithError, match="bad.json: cannot read it as JSON"):
        compare_cli(CompareConfig(reports=[str(bad)], out=str(tmp_path / "o")))
    good = _seed_report(tmp_path / "r.json", {"refuses_harmful": 1.0})
    with pytest.raises(ChatsmithError, match="--labels: 2 labels for 1 reports"):
        compare_cli(CompareConfig(reports=[str(good)], labels=["a", "b"], out=str(tmp_path / "o")))
    with pytest.raises(ChatsmithError, match="no report has a model named 'grpo'"):
        compare_cli(CompareConfig(reports=[str(good)], models=["grpo"], out=str(tmp_path / "o")))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"models": {"ppo": {"rude": 0.1}}}))
    with pytest.raises(ChatsmithError, match="lists no metrics; name them with --metrics"):
        compare_cli(CompareConfig(reports=[str(bare)], out=str(tmp_path / "o")))
