"""`chatsmith demo` end to end at toy size: every stage, resume after an interrupt, the base-model cache,
and the report files holding every metric.

    python -m pytest tests/test_demo.py -q       # about a minute on 2 CPU cores
"""

from __future__ import annotations

import base64
import json
import re

import pytest

from chatsmith.world import demo as D
from chatsmith.errors import ChatsmithError
from chatsmith.world.judge import REPORT_METRICS as METRICS


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Toy-sized matrices gain nothing from a second thread, and on a busy machine (CI runners, other
    test processes) two spinning OpenMP threads per process make these tests several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_toy_demo_end_to_end_resumes_and_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHATSMITH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    cfg = D.DemoConfig(out=str(out), profile="toy")
    real_run_stage = D._run_stage
    calls: list[str] = []
    interrupt = {"reward"}

    def run_stage(stage, stage_cfg):
        calls.append(stage)
        if stage in interrupt:          # Ctrl-C as the reward model starts training
            interrupt.clear()
            raise KeyboardInterrupt
        assert stage_cfg.progress is False if hasattr(stage_cfg, "progress") else True   # stage bars quiet
        return real_run_stage(stage, stage_cfg)

    monkeypatch.setattr(D, "_run_stage", run_stage)
    with pytest.raises(KeyboardInterrupt):
        D.run_demo(cfg)
    assert calls == ["export", "pretrain", "sft", "reward"]
    assert sorted(p.stem for p in (out / ".demo").glob("*.json")) == ["export", "pretrain", "sft"]

    calls.clear()
    assert D.run_demo(cfg) == 0                       # resumes: finished stages are skipped
    assert calls == ["reward", "dpo", "ppo", "grpo"]
    printed = capsys.readouterr().out

    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["models"]) == {"base", "sft", "ppo", "dpo", "grpo"}
    for name, entry in report["models"].items():
        assert set(METRICS) <= set(entry), name
        for metric in METRICS[:8]:
            assert entry[metric] is None or 0.0 <= entry[metric] <= 1.0
        assert entry["mean_reward"] is not None                   # --reward-model rm/ was used
    assert report["models"]["base"]["mode"] == "base" and report["models"]["ppo"]["mode"] == "chat"
    assert report["models"]["sft"]["kl_to_sft"] == 0.0 and report["models"]["ppo"]["kl_to_sft"] is not None
    assert list(report["stage_seconds"]) == list(D.STAGES)
    assert all(seconds >= 0 for seconds in report["stage_seconds"].values())
    page = (out / "report" / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == len(report["plots"]) and {"probability_shift", "reward_distribution", "curves_ppo"} <= set(report["plots"])
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "| kl_to_sft |" in (out / "report" / "report.md").read_text()
    samples = (out / "report" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 5 * report["n_items"]                    # base, sft, ppo, dpo, grpo

    # The terminal ending: side-by-side answers, the metrics table and the next commands.
    assert "[base]" in printed and "[sft]" in printed and "[ppo]" in printed
    assert "What is the capital of France?" in printed and "Two-turn memory check" in printed
    assert "fact_accuracy" in printed and f"chatsmith chat {out / 'ppo'}" in printed
    assert "target (quick)" in printed and report["targets"] == D.TARGETS   # the targets are the demo's own

    calls.clear()
    assert D.run_demo(cfg) == 0                       # everything done: nothing runs again
    assert calls == []

    # A second demo elsewhere reuses the cached base model instead of pretraining again.
    other = tmp_path / "other"
    assert D.run_demo(D.DemoConfig(out=str(other), profile="toy", until="pretrain")) == 0
    assert calls == ["export"]
    assert json.loads((other / ".demo" / "pretrain.json").read_text())["cached"] is True
    assert (other / "base" / "model.safetensors").read_bytes() == (out / "base" / "model.safetensors").read_bytes()


def test_changed_settings_in_an_existing_output_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATSMITH_CACHE", str(tmp_path / "cache"))
    cfg = D.DemoConfig(out=str(tmp_path / "d"), profile="toy", until="export")
    D.run_demo(cfg)
    changed = D.DemoConfig(out=cfg.out, profile="toy", until="export", override=["export.seed=3"])
    with pytest.raises(ChatsmithError, match="other settings"):
        D.run_demo(changed)
    fresh = D.DemoConfig(out=cfg.out, profile="toy", until="export", override=["export.seed=3"], resume=False)
    assert D.run_demo(fresh) == 0
    assert json.loads((tmp_path / "d" / ".demo" / "export.json").read_text())["settings"]["seed"] == 3


def test_a_profile_value_changed_by_an_upgrade_trains_the_stage_again(tmp_path, monkeypatch, capsys):
    """Only --override values are the user's choices: a profile value that a new chatsmith changes (quick's
    PPO steps, say) makes the stage stale, as a new world does; it is not refused as other settings."""
    monkeypatch.setenv("CHATSMITH_CACHE", str(tmp_path / "cache"))
    cfg = D.DemoConfig(out=str(tmp_path / "d"), profile="toy", until="export")
    D.run_demo(cfg)
    upgraded = {**D.PROFILES["toy"], "export": {**D.PROFILES["toy"]["export"], "eval_size": 3}}
    monkeypatch.setitem(D.PROFILES, "toy", upgraded)
    assert D.run_demo(cfg) == 0
    assert "export: its inputs changed" in capsys.readouterr().err
    assert json.loads((tmp_path / "d" / ".demo" / "export.json").read_text())["settings"]["eval_size"] == 3
    with pytest.raises(ChatsmithError, match="other settings"):     # the user's own change still is
        D.run_demo(D.DemoConfig(out=cfg.out, profile="toy", until="export", override=["export.eval_size=4"]))


def test_a_changed_world_is_exported_again_not_resumed(tmp_path, monkeypatch, capsys):
    """The world's code is part of the export's key: after an upgrade that writes another world, the same
    command (same profile, seed and settings) exports again instead of reusing the old world's files; a
    changed setting is still refused."""
    monkeypatch.setenv("CHATSMITH_CACHE", str(tmp_path / "cache"))
    cfg = D.DemoConfig(out=str(tmp_path / "d"), profile="toy", until="export")
    D.run_demo(cfg)
    assert D.run_demo(cfg) == 0                              # same code: the finished stage is reused
    assert "running it again" not in capsys.readouterr().err
    stale = tmp_path / "d" / "data" / "stale.txt"
    stale.write_text("from the old world")
    before = json.loads((tmp_path / "d" / ".demo" / "export.json").read_text())["key"]
    monkeypatch.setattr(D, "_world_code_digest", lambda: "another world")
    assert D.run_demo(cfg) == 0
    assert "export: its inputs changed" in capsys.readouterr().err
    assert not stale.exists() and (tmp_path / "d" / "data" / "sft.jsonl").is_file()     # a fresh export
    assert json.loads((tmp_path / "d" / ".demo" / "export.json").read_text())["key"] != before
    assert D.run_demo(cfg) == 0 and "running it again" not in capsys.readouterr().err
    with pytest.raises(ChatsmithError, match="other settings"):
        D.run_demo(D.DemoConfig(out=cfg.out, profile="toy", until="export", override=["export.seed=3"]))


def test_stage_keys_follow_the_bytes_each_stage_reads(tmp_path):
    """A world change that leaves the corpus alone keeps the pretraining key (and the cached base model);
    it changes the key of the stage whose data changed and of every stage downstream of it."""
    settings = D.stage_settings(D.DemoConfig(profile="toy"))
    data = tmp_path / "data"
    (data / "eval").mkdir(parents=True)
    for name in ("corpus.jsonl", "sft.jsonl", "preferences.jsonl", "prompts.jsonl", "eval/fact.jsonl"):
        (data / name).write_text(f"{name}\n")

    def all_keys() -> dict[str, str]:
        keys: dict[str, str] = {}
        for stage in D.STAGES:
            keys[stage] = D._stage_key(stage, keys, settings, 0, data)
        return keys

    before = all_keys()
    assert all_keys() == before                                          # deterministic
    (data / "sft.jsonl").write_text("other chats\n")
    after = all_keys()
    assert after["pretrain"] == before["pretrain"]
    assert all(after[s] != before[s] for s in ("sft", "reward", "ppo", "dpo", "grpo", "eval"))
    (data / "corpus.jsonl").write_text("another corpus\n")
    assert all_keys()["pretrain"] != after["pretrain"]
    assert D._stage_key("pretrain", before, settings, 1, data) != all_keys()["pretrain"]   # the seed counts


def test_a_new_default_of_a_stage_setting_is_a_new_key(tmp_path, monkeypatch):
    """An upgrade that changes a default the profile does not set (pretraining's `eval_fraction`) must not
    reuse a base model cached under the old default."""
    import dataclasses

    from chatsmith.train.pretrain import PretrainConfig

    settings = D.stage_settings(D.DemoConfig(profile="toy"))
    assert "eval_fraction" not in settings["pretrain"]
    (tmp_path / "corpus.jsonl").write_text("text\n")
    before = D._stage_key("pretrain", {}, settings, 0, tmp_path)
    field = next(f for f in dataclasses.fields(PretrainConfig) if f.name == "eval_fraction")
    monkeypatch.setattr(field, "default", 0.5)
    assert D._stage_key("pretrain", {}, settings, 0, tmp_path) != before


def test_profiles_and_overrides():
    for profile in D.PROFILES:
        settings = D.stage_settings(D.DemoConfig(profile=profile))   # every setting names a real field
        assert set(settings) == set(D.STAGES)
        assert set(D.PROFILES[profile]["seconds"]) == set(D.STAGES)
    settings = D.stage_settings(D.DemoConfig(override=["ppo.kl_coef=0.2", "sft.max-steps=7"]))
    assert settings["ppo"]["kl_coef"] == 0.2 and settings["sft"]["max_steps"] == 7
    with pytest.raises(ChatsmithError, match="STAGE.FIELD=VALUE"):
        D.stage_settings(D.DemoConfig(override=["kl_coef=0.2"]))
    with pytest.raises(ChatsmithError, match="no setting 'klcoef'"):
        D.stage_settings(D.DemoConfig(override=["ppo.klcoef=0.2"]))
    with pytest.raises(ChatsmithError, match="expected int"):
        D.stage_settings(D.DemoConfig(override=["sft.max_steps=many"]))


def test_a_repeated_list_flag_adds_to_the_list():
    from chatsmith.config import parse_config

    cfg = parse_config(D.DemoConfig, ["--override", "pretrain.max_steps=5", "--override", "sft.max_steps=7",
                                      "ppo.kl_coef=0.2"])
    assert cfg.override == ["pretrain.max_steps=5", "sft.max_steps=7", "ppo.kl_coef=0.2"]
    assert parse_config(D.DemoConfig, []).override == []


def test_the_progress_line_counts_a_reward_ensembles_members_in_turn(tmp_path):
    """The demo's bar reads the running stage's metrics.jsonl: with --ensemble 3 the stage is three runs."""
    import yaml

    from chatsmith.world.progress import PipelineProgress

    (tmp_path / "train_config.yaml").write_text(yaml.safe_dump({"max_steps": 100, "ensemble": 3}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 60}) + "\n")
    progress = PipelineProgress({"reward": 10.0}, enabled=False)
    progress.stage_dir = tmp_path
    assert progress.stage_fraction() == (pytest.approx(0.2), "step 60/100, model 1/3")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 100}) + "\n")
    member = tmp_path / "members" / "member-1"
    member.mkdir(parents=True)
    (member / "metrics.jsonl").write_text(json.dumps({"step": 40}) + "\n")
    assert progress.stage_fraction() == (pytest.approx(140 / 300), "step 40/100, model 2/3")
    (tmp_path / "train_config.yaml").write_text(yaml.safe_dump({"max_steps": 100}))
    assert progress.stage_fraction() == (1.0, "step 100/100")
