"""The judge and reward interface: how evaluation and RL reach a user's Python function (or the world's).

    chatsmith eval MODEL --suite items.jsonl --judge py:my_judges:judge
    chatsmith grpo --model runs/sft --prompts p.jsonl --reward py:my_rewards:length_reward
    chatsmith rlhf --policy runs/sft --prompts p.jsonl --judge py:my_rewards:score

Two protocols, both plain functions:
- a *judge* takes `(item, response)` and returns `{metric: bool | float | None}`; `item` has `id`,
  `category`, `messages` and `expected` (an `EvalItem`). It may accept `finished=` (did the answer end
  with a stop token). Evaluation averages each metric over the items whose verdict has it, overall and per
  category. A judge may carry a `metrics` attribute `{report metric: (verdict key, categories or None)}`
  to name its own rates instead (the world's judge does), and `metric_help` `{metric: description}`.
- a *reward* takes `(messages, response, item)` and returns a float: `messages` is the prompt
  conversation, `item` the prompt row's other fields (`id`, `category`, `expected`, ...). It may accept
  `finished=` as well. GRPO uses it as the reward of each response; the rlhf labeler ranks by it.

A spec names one: `py:module:function` (a module importable from `sys.path`, e.g. through PYTHONPATH),
or `world`, the built-in world's (`py:chatsmith.world.judge:judge` / `...:reward`). The core names the
world only through these strings, so `import chatsmith.eval` / `chatsmith.train` never imports it.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from chatsmith.chat.reasoning import split_reasoning
from chatsmith.errors import ChatsmithError, DataError

BUILTIN_JUDGES = {"world": "py:chatsmith.world.judge:judge"}
BUILTIN_REWARDS = {"world": "py:chatsmith.world.judge:reward"}
BUILTIN_SUITES = {"world": "py:chatsmith.world.generator:eval_suite"}
"""Built-in suites: `f(seed=...) -> (held-out items, showcase items)`."""


@dataclass
class EvalItem:
    """One judgeable prompt: `messages` end with the user's turn; `expected` says what a good reply has."""

    id: str
    category: str
    messages: list[dict]
    expected: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The last user message (what a base model sees as raw text, for single-turn items)."""
        return next((m["content"] for m in reversed(self.messages) if m.get("role") == "user"), "")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "messages": [dict(m) for m in self.messages],
                "expected": dict(self.expected)}

    @classmethod
    def from_dict(cls, row: Any, origin: str = "row") -> "EvalItem":
        """Build from a `{id, category, messages, expected}` row; errors name `origin` and the field."""
        if not isinstance(row, dict):
            raise DataError(f"{origin}: expected a JSON object with id, category, messages, expected")
        category = row.get("category")
        if not isinstance(category, str) or not category:
            raise DataError(f"{origin}: field 'category' must be a non-empty string, got {category!r}")
        messages = row.get("messages")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
            raise DataError(f"{origin}: field 'messages' must be a non-empty list of {{role, content}} objects")
        expected = row.get("expected", {})
        if not isinstance(expected, dict):
            raise DataError(f"{origin}: field 'expected' must be an object, got {type(expected).__name__}")
        return cls(str(row.get("id", origin)), category, [dict(m) for m in messages], dict(expected))


def load_callable(spec: str, option: str = "--judge") -> Callable[..., Any]:
    """The function a `py:module:function` spec names; a clear error naming `option` and the spec otherwise."""
    kind, _, rest = spec.partition(":")
    module_name, _, attr = rest.partition(":")
    if kind != "py" or not module_name or not attr:
        raise ChatsmithError(f"{option} {spec}: expected py:MODULE:FUNCTION (e.g. py:my_judges:judge)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ChatsmithError(f"{option} {spec}: no module named {module_name!r} (is its directory on "
                                 f"PYTHONPATH?)") from None
        raise
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ChatsmithError(f"{option} {spec}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ChatsmithError(f"{option} {spec}: {module_name}.{attr} is not callable "
                             f"(a {type(fn).__name__})")
    return fn


def resolve_judge(spec: str | Callable[..., dict]) -> Callable[..., dict]:
    """A judge function from a spec (`world` or `py:module:function`), or the function itself."""
    if callable(spec):
        return spec
    return load_callable(BUILTIN_JUDGES.get(spec, spec), "--judge")


def resolve_reward(spec: str | Callable[..., float], option: str = "--reward") -> Callable[..., float]:
    """A reward function from a spec (`world` or `py:module:function`), or the function itself."""
    if callable(spec):
        return spec
    return load_callable(BUILTIN_REWARDS.get(spec, spec), option)


def accepts_finished(fn: Callable[..., Any]) -> bool:
    """Does `fn` take a `finished=` keyword (or **kwargs)?"""
    return _accepts(fn, "finished")


def _accepts(fn: Callable[..., Any], keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def call_judge(judge_fn: Callable[..., dict], item: Any, response: str, finished: bool) -> dict:
    """The judge's verdict as a dict, passing `finished` when the judge accepts it."""
    if accepts_finished(judge_fn):
        return dict(judge_fn(item, response, finished=finished))
    return dict(judge_fn(item, response))


def call_reward(reward_fn: Callable[..., float], messages: list[dict], response: str, item: dict,
                finished: bool) -> float:
    """The reward as a float, passing `finished` when the function accepts it. The function scores the reply
    a user is shown: thinking before it (`<think>…</think>`, chat/reasoning.py) is removed, and passed as
    `reasoning=` (None when there is none) to a function that takes that keyword."""
    reasoning, reply = split_reasoning(response)
    kwargs: dict[str, Any] = {"finished": finished} if accepts_finished(reward_fn) else {}
    if _accepts(reward_fn, "reasoning"):
        kwargs["reasoning"] = reasoning
    value = reward_fn(messages, reply, item, **kwargs)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ChatsmithError(f"reward function {getattr(reward_fn, '__qualname__', reward_fn)!r} returned "
                             f"{value!r}, expected a number") from None


def metric_specs(judge: str | Callable[..., dict] = "world") -> dict[str, tuple[str, tuple[str, ...] | None]] | None:
    """{report metric: (verdict key, categories or None)} from the judge's `metrics` attribute, or None
    (then every verdict key is averaged overall and per category, see `default_specs`)."""
    metrics = getattr(resolve_judge(judge), "metrics", None)
    if metrics is None:
        return None
    return {name: (key, tuple(cats) if cats is not None else None) for name, (key, cats) in metrics.items()}


def default_specs(items: list[Any], verdicts: list[dict]) -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """Every verdict key overall (`key`) and per category (`category/key`), in first-seen order."""
    keys = list(dict.fromkeys(k for v in verdicts for k in v))
    categories = list(dict.fromkeys(item.category for item in items))
    specs: dict[str, tuple[str, tuple[str, ...] | None]] = {key: (key, None) for key in keys}
    for category in categories:
        for key in keys:
            if any(key in v for item, v in zip(items, verdicts) if item.category == category):
                specs[f"{category}/{key}"] = (key, (category,))
    return specs
