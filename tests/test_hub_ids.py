"""Every model argument takes a Hugging Face Hub id the way `--model` does: one helper
(`chatsmith.model.checked_model_source`) tells a local directory from a Hub id, and an id that is not a directory
here reaches transformers, whose offline error is shown (nothing can be downloaded in the tests:
HF_HUB_OFFLINE=1, set in conftest before transformers is imported).

Run: python -m pytest tests/test_hub_ids.py -q
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from chatsmith.errors import ChatsmithError

HUB_ID = "chatsmith-test/no-such-model"


def assert_offline_error(message: str, flag: str = "") -> None:
    assert message.startswith(flag), message
    assert HUB_ID in message and "Hugging Face Hub id" in message, message
    assert "not found" not in message.split(":")[1] and "no config.json" not in message, message
    assert "offline" in message.lower() or "couldn't connect" in message.lower(), message


@pytest.fixture
def config_reads(monkeypatch):
    """The names transformers was asked to read a config for."""
    from transformers import PretrainedConfig

    asked = []
    original = PretrainedConfig.get_config_dict.__func__

    def spy(cls, name, *args, **kwargs):
        asked.append(str(name))
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(PretrainedConfig, "get_config_dict", classmethod(spy))
    return asked


def test_reward_model_argument_takes_a_hub_id(config_reads):
    from chatsmith.reward_model import load_reward_model
    from chatsmith.train.rollout import check_reward_spec

    for spec in (HUB_ID, f"rm:{HUB_ID}"):
        with pytest.raises(ChatsmithError) as err:
            check_reward_spec(spec, "--reward-model")
        assert_offline_error(str(err.value), "--reward-model ")
    with pytest.raises(ChatsmithError) as err:
        load_reward_model(HUB_ID, device="cpu")
    assert_offline_error(str(err.value))
    assert config_reads == [HUB_ID] * 3


def test_value_model_argument_takes_a_hub_id():
    from chatsmith.train.ppo import PPOTrainer

    owner = SimpleNamespace(cfg=SimpleNamespace(value_model=HUB_ID, reward_model="world"))
    with pytest.raises(ChatsmithError) as err:
        PPOTrainer._load_value_model(owner)
    assert_offline_error(str(err.value), "--value-model ")


def test_eval_models_take_a_hub_id():
    from chatsmith.eval.behaviour import load_model_under_test

    with pytest.raises(ChatsmithError) as err:
        load_model_under_test(HUB_ID, "sft", device="cpu")
    assert_offline_error(str(err.value))


def test_local_paths_are_still_checked_as_directories(tmp_path):
    from chatsmith.eval.behaviour import load_model_under_test
    from chatsmith.train.rollout import check_reward_spec

    with pytest.raises(ChatsmithError, match=r"^--reward-model .*: not a model directory \(no config.json or adapter_config.json\); train"):
        check_reward_spec(str(tmp_path), "--reward-model")
    with pytest.raises(ChatsmithError, match=r"model directory not found"):
        check_reward_spec(str(tmp_path / "missing" / "rm" / "x"), "--reward-model")
    with pytest.raises(ChatsmithError, match=r"model directory not found; expected"):
        load_model_under_test(tmp_path / "a" / "b" / "c", "x")


def test_no_module_but_model_py_looks_for_config_json_itself():
    """The core's model arguments all go through model.py (the world's demo checks its own cache, not an
    argument)."""
    root = Path(__file__).resolve().parents[1] / "src" / "chatsmith"
    pattern = re.compile(r"""/ ["']config\.json["']""")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "model.py" and "world" not in p.parts and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
