"""The judge/reward plug-in interface (`chatsmith.eval.judges`): specs resolve to the user's functions with
clear errors, the built-in `world` spec reaches the world by name only, and the core never imports the
world. Run: `python -m pytest tests/test_plugins.py -q`. (The end-to-end uses are in test_eval.py,
test_grpo.py and test_rlhf.py.)"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatsmith.errors import ChatsmithError
from chatsmith.eval.judges import (EvalItem, call_judge, call_reward, default_specs, load_callable, metric_specs,
                                   resolve_judge, resolve_reward)

SRC = Path(__file__).resolve().parents[1] / "src"


def test_the_core_never_imports_the_world():
    """In a fresh interpreter, so modules imported earlier in this test session do not count."""
    code = ("import sys\n"
            "import chatsmith.train, chatsmith.eval, chatsmith.chat, chatsmith.data\n"
            "import chatsmith.generate, chatsmith.model\n"
            "import chatsmith.train.rollout, chatsmith.train.grpo, chatsmith.train.ppo, chatsmith.train.rlhf\n"
            "import chatsmith.eval.behaviour, chatsmith.eval.report, chatsmith.eval.judges, chatsmith.cli\n"
            "loaded = [m for m in sys.modules if m.startswith('chatsmith.world')]\n"
            "assert not loaded, loaded\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_core_module_has_an_import_of_the_world_even_a_lazy_one():
    """The core names the world only in spec strings (`py:chatsmith.world...`, the CLI's command table)."""
    offenders = []
    for path in sorted((SRC / "chatsmith").rglob("*.py")):
        if "world" in path.relative_to(SRC / "chatsmith").parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno}" for n in names if n.startswith("chatsmith.world")]
    assert offenders == []


def test_load_callable_resolves_a_user_function(tmp_path, monkeypatch):
    (tmp_path / "plug_ok.py").write_text("def judge(item, response):\n    return {'long': len(response) > 3}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_callable("py:plug_ok:judge")
    assert fn(None, "hello") == {"long": True}
    assert resolve_judge("py:plug_ok:judge") is fn and resolve_judge(fn) is fn


@pytest.mark.parametrize("spec, message", [
    ("py:no_such_plugin_module:f", r"--judge py:no_such_plugin_module:f: no module named 'no_such_plugin_module'"),
    ("py:plug_bad:missing", r"--judge py:plug_bad:missing: module 'plug_bad' has no attribute 'missing'"),
    ("py:plug_bad:VALUE", r"--judge py:plug_bad:VALUE: plug_bad.VALUE is not callable \(a int\)"),
    ("plug_bad:judge", r"--judge plug_bad:judge: expected py:MODULE:FUNCTION"),
    ("py:plug_bad", r"expected py:MODULE:FUNCTION"),
])
def test_bad_specs_say_what_is_wrong(tmp_path, monkeypatch, spec, message):
    (tmp_path / "plug_bad.py").write_text("VALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ChatsmithError, match=message):
        resolve_judge(spec)


def test_a_broken_import_inside_the_users_module_is_not_hidden(tmp_path, monkeypatch):
    (tmp_path / "plug_broken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        resolve_judge("py:plug_broken:judge")


def test_reward_specs_name_their_option_and_world_is_the_worlds_judge():
    with pytest.raises(ChatsmithError, match=r"^--reward py:nowhere_xyz:f: no module"):
        resolve_reward("py:nowhere_xyz:f")
    with pytest.raises(ChatsmithError, match=r"^--judge py:nowhere_xyz:f: no module"):
        resolve_reward("py:nowhere_xyz:f", "--judge")
    from chatsmith.world import judge as world_judge

    assert resolve_judge("world") is world_judge.judge and resolve_reward("world") is world_judge.reward
    assert metric_specs("world")["refuses_harmful"] == ("refuses", ("harmful",))


def test_finished_is_passed_only_to_functions_that_take_it():
    item = EvalItem("1", "chat", [{"role": "user", "content": "hi"}])
    assert call_judge(lambda it, r: {"n": len(r)}, item, "abc", finished=True) == {"n": 3}
    assert call_judge(lambda it, r, finished: {"f": finished}, item, "abc", finished=False) == {"f": False}
    assert call_reward(lambda m, r, row: len(r), item.messages, "abcd", {}, True) == 4.0
    assert call_reward(lambda m, r, row, **kw: kw["finished"], item.messages, "x", {}, False) == 0.0
    with pytest.raises(ChatsmithError, match="expected a number"):
        call_reward(lambda m, r, row: "good", item.messages, "x", {}, True)


def test_default_specs_average_every_key_overall_and_per_category():
    items = [EvalItem("a", "greet", [{"role": "user", "content": "hi"}]),
             EvalItem("b", "math", [{"role": "user", "content": "1+1"}])]
    specs = default_specs(items, [{"polite": True}, {"polite": False, "correct": True}])
    assert specs == {"polite": ("polite", None), "correct": ("correct", None),
                     "greet/polite": ("polite", ("greet",)), "math/polite": ("polite", ("math",)),
                     "math/correct": ("correct", ("math",))}


def test_core_items_take_any_category_and_check_their_fields():
    row = {"id": "q1", "category": "my_own", "messages": [{"role": "user", "content": "x"}], "expected": {"k": 1}}
    assert EvalItem.from_dict(row).to_dict() == row
    with pytest.raises(ChatsmithError, match="items.jsonl:4: field 'messages'"):
        EvalItem.from_dict({**row, "messages": []}, origin="items.jsonl:4")
    with pytest.raises(ChatsmithError, match="field 'expected' must be an object"):
        EvalItem.from_dict({**row, "expected": [1]})
