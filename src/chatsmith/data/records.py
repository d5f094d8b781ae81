"""Row formats of chat data: detect a row's format, validate it, convert it to an example.

    from chatsmith.data.records import convert_record, detect_format
    fmt = detect_format(row)                                   # "messages", "alpaca", "preference", ...
    example = convert_record(row, fmt, "chat", "sft.jsonl:3")  # ChatExample; RowError if the row is bad

`chatsmith.data.formats.load_examples` reads whole files with these. No I/O here.

Row formats (auto-detected from the first 50 rows of a file, majority vote; force with `format=`):
- `messages`   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (OpenAI style;
               content may also be a list of {"type": "text", "text": ...} parts; tool calls, `tool`
               messages and a row-level `tools` list as in `chatsmith.data.tools`; an assistant message may
               carry its thinking in `reasoning_content`, see `chatsmith.chat.reasoning`)
- `sharegpt`   {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}  (also accepts
               from = user/assistant/chatgpt/model; an optional top-level "system" string)
- `alpaca`     {"instruction": "...", "input": "..." (optional), "output": "...", "system": "..." (optional)}
               -> user message `instruction` (+ "\n\n" + `input` when non-empty), assistant `output`.
- `prompt_completion` {"prompt": str | messages, "completion": str | messages}; a completion given as
               messages may repeat the prompt (it is then removed). A row with a prompt only is a prompt.
- `text`       {"text": "..."}  plain pretraining text.
- `preference` {"prompt": str | messages, "chosen": R, "rejected": R} where R is a string, an
               {"role": "assistant", "content": ...} object, or a message list whose last message is the
               assistant reply (a list that repeats the prompt before it is fine: its final assistant turn
               is taken). Without "prompt", chosen/rejected must be conversations sharing everything
               before their final reply (that shared part is the prompt).
- `ranked`     K >= 2 responses best first (may be mixed with `preference` rows in one file), in one of
               three shapes:
               {"prompt": P, "ranked": [R_best, ..., R_worst]};
               {"prompt": P, "responses": [R0, R1, ...], "ranking": [i_best, ..., i_worst]} (0-based
               indices, a permutation of all responses);
               {"prompt": P, "responses": [R0, ...], "scores": [s0, ...]} (higher is better, no ties).
Every format except `messages` accepts an optional top-level "system" string, prepended as a system
message. Keys a format does not use (e.g. "id", "category") are kept in the example's `meta`.

Kinds (what a stage needs; `kind=None` = the format's natural kind, where a chat file whose first rows
mostly end with a user turn, like the world's prompts.jsonl, counts as `prompt` data):
- `text`: only `text` rows. Chat or preference data used as pretraining text is an error.
- `chat`: `messages`, `sharegpt`, `alpaca`, `prompt_completion`; preference/ranked data give
  prompt + best (chosen) response, i.e. SFT on the preferred replies. A conversation needs an
  assistant turn.
- `preference`: `preference` and `ranked` rows -> PreferenceExample(prompt, responses best first).
- `prompt` (for PPO/GRPO): any chat or preference row, cut after its last user message ->
  ChatExample whose messages end with a user turn.

Validation: every bad row (broken JSON, missing field, unknown role, empty assistant reply, wrong
type, conversation without an assistant turn, identical responses, bad ranking) becomes a `BadRow`
whose origin is `path:line` (JSONL/JSON) or `path#row N` (0-based, Parquet/datasets). With
`on_bad_row="error"` (default) loading raises DataError listing the first 5 and the total count; with
"skip" they are skipped and counted by reason in `LoadResult.summary()`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from chatsmith.errors import DataError
from chatsmith.chat.reasoning import REASONING_FIELD, fold_reasoning

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "ranked")
KINDS = ("text", "chat", "preference", "prompt")
NATURAL_KIND = {"messages": "chat", "sharegpt": "chat", "alpaca": "chat", "prompt_completion": "chat",
                "text": "text", "preference": "preference", "ranked": "preference"}
# kind -> formats that can provide it (conversions documented at the top of the file)
ALLOWED_FORMATS = {
    "text": ("text",),
    "chat": ("messages", "sharegpt", "alpaca", "prompt_completion", "preference", "ranked"),
    "preference": ("preference", "ranked"),
    "prompt": ("messages", "sharegpt", "alpaca", "prompt_completion", "preference", "ranked"),
}
FORMAT_ALIASES = {"openai": "messages", "chat": "messages", "prompt-completion": "prompt_completion",
                  "completion": "prompt_completion", "pretraining": "text", "pairwise": "preference",
                  "dpo": "preference", "ranking": "ranked"}
ROLES = ("system", "user", "assistant", "tool")   # tool: a function's result (`chatsmith.data.tools`)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}
FORMAT_EXAMPLES = {
    "messages": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    "sharegpt": '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}',
    "alpaca": '{"instruction": "Say hi", "input": "", "output": "Hello!"}',
    "prompt_completion": '{"prompt": "Hi", "completion": "Hello!"}',
    "text": '{"text": "Paris is the capital of France."}',
    "preference": '{"prompt": "Hi", "chosen": "Hello!", "rejected": "what"}',
    "ranked": '{"prompt": "Hi", "ranked": ["Hello!", "hi", "what"]}',
}
DETECT_ROWS = 50          # rows looked at to detect a file's format
LIST_BAD_ROWS = 5         # bad rows listed in the error raised by on_bad_row="error"

# Bad-row categories (the summary counts skipped rows by these).
BROKEN_JSON = "broken JSON"
NOT_OBJECT = "not an object"
MISSING = "missing field"
WRONG_TYPE = "wrong type"
UNKNOWN_ROLE = "unknown role"
EMPTY = "empty content"
NO_ASSISTANT = "no assistant turn"
NO_USER = "no user turn"
IDENTICAL = "identical responses"
BAD_RANKING = "bad ranking"
UNKNOWN_FORMAT = "unknown format"
UNEXPECTED = "unexpected"   # a row that tripped a bug in this module; tests assert it never happens


# ----------------------------------------------------------------------------- examples

@dataclass
class TextExample:
    """A pretraining document."""
    text: str
    origin: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class ChatExample:
    """A conversation: `messages` = [{"role", "content"}, ...]; `tools`: the row's function schemas, if any."""
    messages: list[dict]
    origin: str = ""
    meta: dict = field(default_factory=dict)
    tools: list[dict] | None = None


@dataclass
class PreferenceExample:
    """A prompt (messages ending with a user turn) and K >= 2 responses ordered best first."""
    prompt: list[dict]
    responses: list[str]
    origin: str = ""
    meta: dict = field(default_factory=dict)

    def pairs(self) -> list[tuple[int, int]]:
        """All (better, worse) index pairs: K*(K-1)/2 of them (InstructGPT expands a K-way ranking so)."""
        k = len(self.responses)
        return [(i, j) for i in range(k) for j in range(i + 1, k)]

    @property
    def chosen(self) -> str:
        return self.responses[0]

    @property
    def rejected(self) -> str:
        return self.responses[-1]


Example = Union[TextExample, ChatExample, PreferenceExample]


@dataclass
class BadRow:
    origin: str
    reason: str
    category: str = "invalid"

    def __str__(self) -> str:
        return f"{self.origin}: {self.reason}"


class RowError(Exception):
    """One row is bad; becomes a BadRow. Never escapes `load_examples`."""

    def __init__(self, category: str, reason: str):
        super().__init__(reason)
        self.category = category
        self.reason = reason


@dataclass
class RawRow:
    origin: str
    value: Any = None
    error: tuple[str, str] | None = None


# ----------------------------------------------------------------------------- format detection

def _present(record: dict) -> set[str]:
    return {k for k, v in record.items() if v is not None}


def detect_row_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    keys = _present(record)
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "ranked" in keys or "responses" in keys:
        return "ranked"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys:
        return "alpaca"
    if "prompt" in keys or "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def format_help() -> str:
    return "; ".join(f"{name}: {ex}" for name, ex in FORMAT_EXAMPLES.items())


def detect_format(record: dict) -> str:
    """The format of one row (see the module docstring); DataError if no known key is present."""
    found = detect_row_format(record)
    if found is None:
        what = f"keys {sorted(map(str, record))[:10]}" if isinstance(record, dict) else type_name(record)
        raise DataError(f"cannot tell the format of a row with {what}. Expected one of: {format_help()}. "
                        "Pass --format to choose one.")
    return found


def normalize_format(name: str) -> str:
    key = name.strip().lower().replace(" ", "_")
    key = FORMAT_ALIASES.get(key, key)
    if key not in FORMATS:
        raise DataError(f"unknown data format {name!r}; expected one of {', '.join(FORMATS)}")
    return key


def detect_file_format(rows: list[RawRow], path: Path) -> str:
    votes: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    first_unknown: Any = None
    looked = 0
    for raw in rows:
        if raw.error is not None:
            continue
        looked += 1
        fmt = detect_row_format(raw.value)
        if fmt is None:
            first_unknown = first_unknown if first_unknown is not None else raw
        else:
            votes[fmt] += 1
            first_seen.setdefault(fmt, looked)
        if looked >= DETECT_ROWS:
            break
    if votes:
        return max(votes, key=lambda f: (votes[f], -first_seen[f]))
    if first_unknown is not None:
        value = first_unknown.value
        what = f"keys {sorted(map(str, value))[:10]}" if isinstance(value, dict) else type_name(value)
        raise DataError(f"{first_unknown.origin}: cannot tell the data format from a row with {what}. "
                        f"Expected one of: {format_help()}. Pass --format to choose one.")
    return "unknown"   # no readable row at all: every row is bad (reported below)


# ----------------------------------------------------------------------------- row validation

def type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _text(value: Any, where: str, *, allow_empty: bool = True) -> str:
    """A string field; content given as OpenAI-style text parts is joined."""
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for i, part in enumerate(value):
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise RowError(WRONG_TYPE, f"{where}[{i}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                "are supported")
            parts.append(part["text"])
        value = "".join(parts)
    if value is None:
        raise RowError(MISSING, f"{where} is missing")
    if not isinstance(value, str):
        raise RowError(WRONG_TYPE, f"{where} should be a string, got {type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates such as "\ud800" decode from JSON but break tokenizers
        raise RowError(WRONG_TYPE, f"{where} holds invalid Unicode (a lone surrogate escape)") from None
    if not allow_empty and not value.strip():
        raise RowError(EMPTY, f"{where} is empty")
    return value


def _messages(value: Any, where: str, *, role_key: str = "role", content_key: str = "content",
              role_map: dict[str, str] | None = None) -> list[dict]:
    if value is None:
        raise RowError(MISSING, f"missing field {where!r}")
    if not isinstance(value, list):
        raise RowError(WRONG_TYPE, f"field {where!r} should be a list of messages, got {type_name(value)}")
    if not value:
        raise RowError(EMPTY, f"field {where!r} is an empty list")
    from chatsmith.data import tools    # here: tools.py imports this module

    out = []
    for i, msg in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(msg, dict):
            raise RowError(WRONG_TYPE, f"{at} should be an object with {role_key!r} and {content_key!r}, "
                            f"got {type_name(msg)}")
        keys_role, keys_content = role_key, content_key
        if role_map is not None and role_key not in msg and "role" in msg:   # ShareGPT files with role/content
            keys_role, keys_content = "role", "content"
        role = msg.get(keys_role)
        if role is None:
            raise RowError(MISSING, f"{at} has no {keys_role!r}")
        if not isinstance(role, str):
            raise RowError(WRONG_TYPE, f"{at}.{keys_role} should be a string, got {type_name(role)}")
        if role_map is not None:
            mapped = role_map.get(role.strip().lower())
            if mapped is None:
                raise RowError(UNKNOWN_ROLE, f"{at}: unknown role {role!r}; expected one of "
                                f"{', '.join(sorted(role_map))}")
        else:
            if role not in ROLES:
                raise RowError(UNKNOWN_ROLE, f"{at}: unknown role {role!r}; expected system, user, assistant or tool")
            mapped = role
        calls = msg.get("tool_calls") if role_map is None and mapped == "assistant" else None
        if calls is not None and msg.get(keys_content) is None:
            msg = {**msg, keys_content: ""}               # a turn that only calls a tool has no text
        if keys_content not in msg or msg[keys_content] is None:
            raise RowError(EMPTY if mapped == "assistant" else MISSING, f"{at} ({mapped}) has no {keys_content!r}")
        content = _text(msg[keys_content], f"{at}.{keys_content}")
        if mapped == "assistant" and not content.strip() and calls is None:
            raise RowError(EMPTY, f"{at}: empty assistant reply")
        extra = tools.message_tool_fields(msg, mapped, calls, at)
        reasoning = msg.get(REASONING_FIELD) if role_map is None else None
        if reasoning is not None:
            if mapped != "assistant":
                raise RowError(WRONG_TYPE, f"{at}: {REASONING_FIELD!r} belongs on an assistant message, not {mapped}")
            extra[REASONING_FIELD] = _text(reasoning, f"{at}.{REASONING_FIELD}")
        out.append({"role": mapped, "content": content, **extra})
    return out


def _with_system(record: dict, messages: list[dict]) -> list[dict]:
    system = record.get("system")
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    text = _text(system, "field 'system'")
    return ([{"role": "system", "content": text}] if text.strip() else []) + messages


def _prompt(value: Any, where: str = "prompt") -> list[dict]:
    """A prompt given as a string or as messages ending with a user turn."""
    if value is None:
        raise RowError(MISSING, f"missing field {where!r}")
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, f"field {where!r}", allow_empty=False)}]
    msgs = _messages(value, where)
    if msgs[-1]["role"] != "user":
        raise RowError(NO_USER, f"field {where!r} should end with a user message, ends with {msgs[-1]['role']}")
    return msgs


def _response(value: Any, where: str) -> tuple[list[dict] | None, str]:
    """A reply: string, {"role": "assistant", "content"} object or a conversation ending with it.
    Returns (the conversation before the reply or None, reply text)."""
    if value is None:
        raise RowError(MISSING, f"missing field {where!r}")
    if isinstance(value, str):
        return None, _text(value, f"field {where!r}", allow_empty=False)
    if isinstance(value, dict):
        msgs = _messages([value], where)
        if msgs[0]["role"] != "assistant":
            raise RowError(WRONG_TYPE, f"field {where!r} should be an assistant message, got role "
                            f"{msgs[0]['role']!r}")
        return None, _reply_text(msgs[0])
    if isinstance(value, list):
        msgs = _messages(value, where)
        if msgs[-1]["role"] != "assistant":
            raise RowError(NO_ASSISTANT, f"field {where!r} should end with an assistant message, ends with "
                            f"{msgs[-1]['role']}")
        return (msgs[:-1] or None), _reply_text(msgs[-1])
    raise RowError(WRONG_TYPE, f"field {where!r} should be a string or a list of messages, got {type_name(value)}")


def _reply_text(message: dict) -> str:
    """A preference reply is text: its reasoning, if any, goes before it as a think block (chat/reasoning.py)."""
    return fold_reasoning([message], "")[0]["content"]


def _same_messages(a: list[dict], b: list[dict]) -> bool:
    return [(m["role"], m["content"]) for m in a] == [(m["role"], m["content"]) for m in b]


def _resolve_prompt(record: dict, contexts: list[tuple[str, list[dict] | None]]) -> list[dict]:
    """The prompt of a preference/ranked row, reconciled with any conversation given with the responses."""
    if record.get("prompt") is not None:
        prompt = _with_system(record, _prompt(record["prompt"]))
        for where, ctx in contexts:
            if ctx is None:
                continue
            # A response list that repeats the prompt (with or without the system message) is fine.
            if not (_same_messages(ctx, prompt) or _same_messages(ctx, [m for m in prompt if m["role"] != "system"])):
                raise RowError(WRONG_TYPE, f"field {where!r} is a conversation that does not start with the prompt")
        return prompt
    given = [(w, c) for w, c in contexts if c is not None]
    if not given or len(given) != len(contexts):
        raise RowError(MISSING, "missing field 'prompt' (or give every response as a conversation that "
                        "includes the prompt)")
    first_where, first = given[0]
    for where, ctx in given[1:]:
        if not _same_messages(ctx, first):
            raise RowError(WRONG_TYPE, f"fields {first_where!r} and {where!r} differ before their final reply, "
                            "so the prompt is ambiguous; add a 'prompt' field")
    if first[-1]["role"] != "user":
        raise RowError(NO_USER, f"the conversation in {first_where!r} should have a user message before the reply")
    return _with_system(record, first)


def _check_distinct(responses: list[str], names: list[str]) -> None:
    seen: dict[str, str] = {}
    for text, name in zip(responses, names):
        key = text.strip()
        if key in seen:
            raise RowError(IDENTICAL, f"{seen[key]} and {name} are identical; a preference needs different responses")
        seen[key] = name


def _parse_preference(record: dict) -> tuple[list[dict], list[str]]:
    ctx_c, chosen = _response(record.get("chosen"), "chosen")
    ctx_r, rejected = _response(record.get("rejected"), "rejected")
    prompt = _resolve_prompt(record, [("chosen", ctx_c), ("rejected", ctx_r)])
    _check_distinct([chosen, rejected], ["chosen", "rejected"])
    return prompt, [chosen, rejected]


def _parse_ranked(record: dict) -> tuple[list[dict], list[str]]:
    if record.get("ranked") is not None:
        items, key = record["ranked"], "ranked"
    elif record.get("responses") is not None:
        items, key = record["responses"], "responses"
    else:
        raise RowError(MISSING, "missing field 'ranked' (or 'responses' with 'ranking' or 'scores')")
    if not isinstance(items, list):
        raise RowError(WRONG_TYPE, f"field {key!r} should be a list of responses, got {type_name(items)}")
    if len(items) < 2:
        raise RowError(BAD_RANKING, f"field {key!r} needs at least 2 responses, got {len(items)}")
    parsed = [_response(item, f"{key}[{i}]") for i, item in enumerate(items)]
    order = list(range(len(items)))
    if key == "responses":
        if record.get("ranking") is not None:
            ranking = record["ranking"]
            if (not isinstance(ranking, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in ranking)):
                raise RowError(WRONG_TYPE, "field 'ranking' should be a list of 0-based response indices, best first")
            if sorted(ranking) != order:
                raise RowError(BAD_RANKING, f"field 'ranking' should list each of the {len(items)} response indices "
                                f"0..{len(items) - 1} once, best first; got {ranking}")
            order = list(ranking)
        elif record.get("scores") is not None:
            scores = record["scores"]
            if (not isinstance(scores, list) or len(scores) != len(items)
                    or any(isinstance(s, bool) or not isinstance(s, (int, float)) or s != s for s in scores)):
                raise RowError(WRONG_TYPE, f"field 'scores' should be a list of {len(items)} numbers")
            if len(set(scores)) != len(scores):
                raise RowError(BAD_RANKING, "field 'scores' has ties; the order of tied responses is unknown")
            order = sorted(order, key=lambda i: -scores[i])
        else:
            raise RowError(MISSING, "field 'responses' needs 'ranking' (indices best first) or 'scores'")
    prompt = _resolve_prompt(record, [(f"{key}[{i}]", parsed[i][0]) for i in order])
    responses = [parsed[i][1] for i in order]
    _check_distinct(responses, [f"{key}[{i}]" for i in order])
    return prompt, responses


def _parse_chat(record: dict, fmt: str, need_reply: bool) -> list[dict]:
    """Messages of a chat-format row (need_reply=False for a prompt-only row)."""
    if fmt == "messages":
        return _messages(record.get("messages"), "messages")
    if fmt == "sharegpt":
        return _with_system(record, _messages(record.get("conversations"), "conversations", role_key="from",
                                              content_key="value", role_map=SHAREGPT_ROLES))
    if fmt == "alpaca":
        instruction = _text(record.get("instruction"), "field 'instruction'")
        extra = record.get("input")
        extra = "" if extra is None else _text(extra, "field 'input'")
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        if not user.strip():
            raise RowError(EMPTY, "field 'instruction' is empty")
        msgs = [{"role": "user", "content": user}]
        if need_reply or record.get("output") is not None:
            msgs.append({"role": "assistant", "content": _text(record.get("output"), "field 'output'",
                                                                allow_empty=False)})
        return _with_system(record, msgs)
    if fmt == "prompt_completion":
        prompt = _prompt(record.get("prompt"))
        completion = record.get("completion")
        if completion is None and not need_reply:
            return _with_system(record, prompt)
        if completion is None:
            raise RowError(MISSING, "missing field 'completion'")
        if isinstance(completion, str):
            reply = [{"role": "assistant", "content": _text(completion, "field 'completion'", allow_empty=False)}]
        elif isinstance(completion, dict):
            reply = _messages([completion], "completion")
        elif isinstance(completion, list):
            reply = _messages(completion, "completion")
            if len(reply) > len(prompt) and _same_messages(reply[:len(prompt)], prompt):
                reply = reply[len(prompt):]   # the completion repeats the prompt
        else:
            raise RowError(WRONG_TYPE, f"field 'completion' should be a string or a list of messages, got "
                            f"{type_name(completion)}")
        return _with_system(record, prompt + reply)
    raise AssertionError(fmt)


_USED_KEYS = {"messages": {"messages", "tools"}, "sharegpt": {"conversations", "system"},
              "alpaca": {"instruction", "input", "output", "system"},
              "prompt_completion": {"prompt", "completion", "system", "tools"}, "text": {"text"},
              "preference": {"prompt", "chosen", "rejected", "system"},
              "ranked": {"prompt", "ranked", "responses", "ranking", "scores", "system"}}


def convert_record(record: Any, fmt: str, kind: str, origin: str) -> Example:
    if not isinstance(record, dict):
        raise RowError(NOT_OBJECT, f"expected a JSON object (one row), got {type_name(record)}")
    record = {k: v for k, v in record.items() if v is not None}
    meta = {k: v for k, v in record.items() if k not in _USED_KEYS[fmt]}
    if fmt == "text":
        return TextExample(_text(record.get("text"), "field 'text'", allow_empty=False), origin, meta)
    if fmt in ("preference", "ranked"):
        # Pairwise and ranked rows mix freely in one file (the built-in world writes both).
        own = detect_row_format(record)
        shape = own if own in ("preference", "ranked") else fmt
        prompt, responses = (_parse_preference if shape == "preference" else _parse_ranked)(record)
        if kind == "preference":
            return PreferenceExample(prompt, responses, origin, meta)
        if kind == "chat":
            return ChatExample(prompt + [{"role": "assistant", "content": responses[0]}], origin, meta)
        return ChatExample(prompt, origin, meta)   # kind == "prompt"
    messages = _parse_chat(record, fmt, need_reply=(kind == "chat"))
    from chatsmith.data.tools import row_tools    # here: tools.py imports this module

    tools = row_tools(record, fmt, messages)
    if kind == "chat":
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError(NO_ASSISTANT, "conversation has no assistant turn (nothing to learn from)")
        return ChatExample(messages, origin, meta, tools)
    # kind == "prompt": everything up to and including the last user message
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user < 0:
        raise RowError(NO_USER, "conversation has no user message to use as a prompt")
    return ChatExample(messages[:last_user + 1], origin, meta, tools)


def _ends_with_prompt(record: Any, fmt: str) -> bool:
    """A chat-format row that stops at a user turn (an RL prompt rather than a demonstration)."""
    if not isinstance(record, dict):
        return False
    if fmt in ("messages", "sharegpt"):
        msgs = record.get("messages" if fmt == "messages" else "conversations")
        last = msgs[-1] if isinstance(msgs, list) and msgs else None
        role = last.get("role", last.get("from")) if isinstance(last, dict) else None
        return isinstance(role, str) and role.strip().lower() in ("user", "human")
    if fmt == "alpaca":
        return record.get("output") is None
    if fmt == "prompt_completion":
        return record.get("completion") is None
    return False


def natural_kind(rows: list[RawRow], fmt: str) -> str:
    """The format's own kind; a chat file whose rows mostly end with a user turn is a prompt file."""
    kind = NATURAL_KIND.get(fmt, "chat")
    if kind == "chat":
        sample = [raw.value for raw in rows if raw.error is None][:DETECT_ROWS]
        if sample and sum(_ends_with_prompt(v, fmt) for v in sample) * 2 > len(sample):
            return "prompt"
    return kind


def kind_error(path: Path, fmt: str, kind: str) -> DataError:
    natural = NATURAL_KIND[fmt]
    if kind == "text":
        hint = ("this stage trains on plain text rows like " + FORMAT_EXAMPLES["text"]
                + "; chat data is rendered with a chat template by `chatsmith sft` instead")
    elif kind == "preference":
        hint = ("this stage needs preference rows like " + FORMAT_EXAMPLES["preference"] + " or "
                + FORMAT_EXAMPLES["ranked"])
    else:
        hint = "this stage needs conversations like " + FORMAT_EXAMPLES["messages"]
    return DataError(f"{path}: holds {fmt} rows ({natural} data), which cannot be used as {kind} data: {hint}")


def format_bad_rows(bad_rows: Sequence[BadRow], limit: int = LIST_BAD_ROWS) -> str:
    lines = [f"  {b}" for b in bad_rows[:limit]]
    if len(bad_rows) > limit:
        lines.append(f"  ... and {len(bad_rows) - limit} more")
    return "\n".join(lines)
