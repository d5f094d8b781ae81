"""The iterate loop (`chatsmith rlhf`) at toy size: rounds run, comparisons accumulate, per-round metrics are
logged, resume skips finished rounds, human label files work. Run: `python -m pytest tests/test_rlhf.py -q`."""

from __future__ import annotations

import json

import pytest
import yaml

from test_grpo import write_toy_dirs
from test_ppo import one_thread  # noqa: F401


def world_prompts_file(tmp_path, n: int = 6):
    from chatsmith.world import World

    # one-turn prompts: a long chat would not fit the tests' max_len and is skipped
    rows = [r for r in World(seed=0).prompts()
            if r["category"] in ("fact", "harmful", "haiku") and len(r["messages"]) == 1][:n]
    path = tmp_path / "world_prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rlhf_cfg(tmp_path, **kw):
    from chatsmith.train.rlhf import RLHFConfig

    model_dir, _, _ = write_toy_dirs(tmp_path)
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump({"norm_samples": 4, "norm_max_new_tokens": 4,
                                                      "max_len": 96, "eval_fraction": 0.25}))
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump({"rollout_batch_size": 4, "batch_size": 4, "ppo_epochs": 1,
                                                       "sample_every": 0, "forward_batch_size": 8}))
    base = dict(policy=str(model_dir), prompts=str(world_prompts_file(tmp_path)), out=str(tmp_path / "rlhf"),
                rounds=2, samples_per_prompt=4, prompts_per_round=6, max_new_tokens=6, max_len=96, rm_steps=2,
                rm_batch_size=4, ppo_steps=2, ppo_lr=1e-3, rm_config=str(tmp_path / "rm.yaml"),
                ppo_config=str(tmp_path / "ppo.yaml"), device="cpu", progress=False)
    base.update(kw)
    return RLHFConfig(**base)


def test_rlhf_two_rounds_with_the_world_judge(tmp_path):
    from chatsmith.data.formats import load_examples
    from chatsmith.train.rlhf import rlhf

    cfg = rlhf_cfg(tmp_path)
    results = rlhf(cfg)
    assert [r.round for r in results] == [1, 2]
    out = tmp_path / "rlhf"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for key in ("comparisons_added", "comparisons_total", "label_score", "rm_eval_accuracy", "ppo_score", "ppo_kl"):
        assert key in rows[0], key
    # Round 2's preference data holds round 1's comparisons plus its own, and the shared loader reads it.
    r1 = load_examples(out / "round_1" / "preferences.jsonl", kind="preference").examples
    r2 = load_examples(out / "round_2" / "preferences.jsonl", kind="preference").examples
    assert len(r1) == rows[0]["comparisons_added"] > 0
    assert len(r2) == rows[0]["comparisons_added"] + rows[1]["comparisons_added"]
    # Round 2 started from round 1's PPO policy; OUT is the final policy as a standard HF chat model.
    assert results[1].policy.endswith("round_2/ppo")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(out))
    assert AutoTokenizer.from_pretrained(str(out)).chat_template
    # Resume: both rounds are done, nothing is recomputed.
    again = rlhf(rlhf_cfg(tmp_path, resume=True))
    assert [r.metrics for r in again] == [r.metrics for r in results]


def test_rank_with_the_world_judge_collapses_ties():
    from chatsmith.world import World
    from chatsmith.train.rlhf import rank_with_judge
    from chatsmith.train.rollout import FunctionScorer, PromptItem
    from chatsmith.world.judge import reward

    row = next(r for r in World(seed=0).prompts() if r["category"] == "fact")
    prompt = PromptItem(row["messages"], "w:1", {k: v for k, v in row.items() if k != "messages"})
    answer = row["expected"]["accept"][0]
    responses = [f"It is {answer}.", "what is the capital of", f"It is {answer}.", f"The answer is {answer}."]
    ranked, scores = rank_with_judge(prompt, responses, [True, True, True, True], FunctionScorer(reward))
    assert ranked[0] == f"It is {answer}."            # correct answer first
    assert len(set(ranked)) == len(ranked) and len(set(scores)) == len(scores)
    assert scores == sorted(scores, reverse=True)


def test_rlhf_with_a_human_label_file(tmp_path):
    from chatsmith.train.rlhf import rlhf

    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"prompt": "What is the capital of France?", "chosen": "Paris.",
                                  "rejected": "What is the capital of Spain?", "round": 1}) + "\n"
                      + json.dumps({"prompt": "Write a haiku.", "ranked": ["Sea waves / ...", "no", "lol"]}) + "\n")
    results = rlhf(rlhf_cfg(tmp_path, labeler="file", labels=str(labels), rounds=1))
    assert results[0].metrics["comparisons_added"] == 2
    samples = [json.loads(x) for x in (tmp_path / "rlhf" / "round_1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(len(s["responses"]) == 4 and s["ranking"] == [] for s in samples)
    # A round with no labels is a clear error that says what to do.
    labels.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "no", "round": 5}) + "\n")
    with pytest.raises(Exception, match="no comparisons for round 1"):
        rlhf(rlhf_cfg(tmp_path, labeler="file", labels=str(labels), rounds=1, out=str(tmp_path / "again")))


def test_rlhf_goes_on_from_an_earlier_ppo_policy(tmp_path):
    """--start-policy: round 1 samples from and trains that policy; the reward model still starts from --policy
    (the SFT model) and PPO's KL stays anchored to it."""
    import shutil

    from chatsmith.train.rlhf import rlhf

    cfg = rlhf_cfg(tmp_path, rounds=1)
    earlier = tmp_path / "earlier_ppo"
    shutil.copytree(cfg.policy, earlier)
    cfg.start_policy = str(earlier)
    rlhf(cfg)
    ppo_settings = yaml.safe_load((tmp_path / "rlhf" / "round_1" / "ppo" / "train_config.yaml").read_text())
    assert ppo_settings["policy"] == str(earlier)
    assert ppo_settings["reference"] == cfg.policy
    rm_settings = yaml.safe_load((tmp_path / "rlhf" / "round_1" / "rm" / "train_config.yaml").read_text())
    assert rm_settings["model"] == cfg.policy


def test_rlhf_labeler_with_a_users_judge(tmp_path, monkeypatch):
    """`--judge py:module:function` ranks the samples by the user's score (longest first here)."""
    from chatsmith.train.rlhf import rlhf

    (tmp_path / "user_labeler_rlhf.py").write_text(
        "def longest(messages, response, row):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    results = rlhf(rlhf_cfg(tmp_path, judge="py:user_labeler_rlhf:longest", rounds=1))
    rows = [json.loads(x) for x in (tmp_path / "rlhf" / "round_1" / "preferences.jsonl").read_text().splitlines()]
    assert rows and results[0].metrics["comparisons_added"] == len(rows)
    for row in rows:
        lengths = [len(r) for r in row["ranked"]]
        assert lengths == sorted(set(lengths), reverse=True) and row["labeler"] == "py:user_labeler_rlhf:longest"
    samples = [json.loads(x) for x in (tmp_path / "rlhf" / "round_1" / "samples.jsonl").read_text().splitlines()]
    mean_length = sum(len(r) for s in samples for r in s["responses"]) / sum(len(s["responses"]) for s in samples)
    assert results[0].metrics["label_score"] == pytest.approx(mean_length, abs=1e-3)
