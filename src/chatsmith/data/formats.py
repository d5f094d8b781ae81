"""Read user data files in the common layouts, validate every row, and report bad rows precisely.

    from chatsmith.data.formats import load_examples
    result = load_examples("sft.jsonl", kind="chat", on_bad_row="skip")
    print(result.summary())            # format, rows read/kept, skipped by reason
    for ex in result.examples: ...     # ChatExample(messages, origin)

Files (chosen by extension, else sniffed from the first bytes):
- JSONL (`.jsonl`, `.ndjson`, optionally `.gz`): one JSON object per line; blank lines are ignored.
- JSON (`.json`): a list of row objects, or `{"data": [row, ...]}`. A `.json` file that really holds
  JSON lines is read as JSONL.
- Parquet (`.parquet`, `.pq`): one row per table row (read with pyarrow); null columns count as absent.
- A local Hugging Face `datasets` directory written by `save_to_disk` (needs the optional package:
  `pip install 'chatsmith[datasets]'`). A DatasetDict uses `split=` (default: `train`, or its only split).

Row formats (auto-detected from the first 50 rows of a file, majority vote; force with `format=`):
- `messages`   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (OpenAI style;
               content may also be a list of {"type": "text", "text": ...} parts)
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

Over-long tokenized conversations: `fit_to_length(ids, mask, turn_boundaries, max_len, policy)` cuts
at the end of an assistant turn (so whole user+assistant exchanges are kept) or drops the example.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from chatsmith.errors import DataError

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
ROLES = ("system", "user", "assistant")
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
    """A conversation: `messages` = [{"role", "content"}, ...]."""
    messages: list[dict]
    origin: str = ""
    meta: dict = field(default_factory=dict)


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


@dataclass
class LoadResult:
    """What `load_examples` read. `truncated`/`dropped` are filled by the stage that applies a max length
    (via `record_fit`) so that one summary tells the whole story."""
    path: str
    format: str
    kind: str
    examples: list = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    rows_read: int = 0
    format_detected: bool = True
    truncated: int = 0
    dropped: int = 0

    @property
    def skipped(self) -> int:
        return len(self.bad_rows)

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(b.category for b in self.bad_rows).most_common())

    def record_fit(self, status: str) -> None:
        """Count the outcome of `fit_to_length` ("kept", "truncated" or "dropped")."""
        if status == "truncated":
            self.truncated += 1
        elif status == "dropped":
            self.dropped += 1

    def summary(self) -> str:
        how = "auto-detected" if self.format_detected else "given"
        lines = [f"{self.path}: format {self.format} ({how}), used as {self.kind} examples",
                 f"  rows read: {self.rows_read}   kept: {len(self.examples)}   skipped: {self.skipped}"]
        if self.bad_rows:
            reasons = ", ".join(f"{k}: {v}" for k, v in self.skipped_by_reason().items())
            lines[-1] += f" ({reasons})"
        if self.truncated or self.dropped:
            lines.append(f"  over max length: {self.truncated} truncated at a turn boundary, "
                         f"{self.dropped} dropped")
        return "\n".join(lines)


class _RowError(Exception):
    """One row is bad; becomes a BadRow. Never escapes this module."""

    def __init__(self, category: str, reason: str):
        super().__init__(reason)
        self.category = category
        self.reason = reason


@dataclass
class _RawRow:
    origin: str
    value: Any = None
    error: tuple[str, str] | None = None


# ----------------------------------------------------------------------------- reading files

def _open_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: not a valid gzip file: {exc}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark written by some editors
        data = data[3:]
    return data


def _parse_json_text(text: str) -> Any:
    """json.loads that turns every failure into _RowError (huge ints and deep nesting raise other types)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _RowError(BROKEN_JSON, f"broken JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise _RowError(BROKEN_JSON, "broken JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more than 4300 digits
        raise _RowError(BROKEN_JSON, f"broken JSON: {exc}") from None


def _read_jsonl(path: Path, data: bytes) -> list[_RawRow]:
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        origin = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append(_RawRow(origin, error=(BROKEN_JSON, f"not valid UTF-8 (byte {exc.start})")))
            continue
        try:
            rows.append(_RawRow(origin, _parse_json_text(text)))
        except _RowError as exc:
            rows.append(_RawRow(origin, error=(exc.category, exc.reason)))
    return rows


def _read_json(path: Path, data: bytes) -> list[_RawRow]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "[":
        return _read_json_array(path, text, start)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":   # several objects one after another: JSON lines in a .json file
            return _read_jsonl(path, data)
        raise DataError(f"{path}:{exc.lineno}: broken JSON: {exc.msg} (column {exc.colno})") from None
    except (RecursionError, ValueError) as exc:
        raise DataError(f"{path}: broken JSON: {exc if not isinstance(exc, RecursionError) else 'nested too deeply'}"
                        ) from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        return [_RawRow(f"{path}#row {i}", row) for i, row in enumerate(value["data"])]
    if isinstance(value, dict):
        # A single row object on its own: accept it as a one-row file rather than refusing.
        if _detect(value) is not None:
            return [_RawRow(f"{path}:1", value)]
        raise DataError(f"{path}: expected a list of rows or {{\"data\": [rows]}}, got an object with keys "
                        f"{sorted(value)[:10]}")
    raise DataError(f"{path}: expected a list of rows or {{\"data\": [rows]}}, got {_type_name(value)}")


def _read_json_array(path: Path, text: str, start: int) -> list[_RawRow]:
    """Parse a top-level JSON array element by element so each row knows its line number."""
    decoder = json.JSONDecoder()
    rows: list[_RawRow] = []
    pos, line, counted = start + 1, 1, 0

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    pos = skip_ws(pos)
    if text[pos:pos + 1] == "]":
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}: broken JSON: {exc.msg} (column {exc.colno}); a JSON file "
                                "cannot be read past a syntax error (JSONL can: one row per line)") from None
            except (RecursionError, ValueError) as exc:
                why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                raise DataError(f"{path}:{line_at(pos)}: broken JSON: {why}") from None
            rows.append(_RawRow(f"{path}:{line_at(pos)}", value))
            pos = skip_ws(end)
            if text[pos:pos + 1] == ",":
                pos = skip_ws(pos + 1)
                continue
            if text[pos:pos + 1] == "]":
                pos += 1
                break
            raise DataError(f"{path}:{line_at(pos)}: broken JSON: expected ',' or ']' after a row")
    if skip_ws(pos) != len(text):
        raise DataError(f"{path}:{line_at(skip_ws(pos))}: broken JSON: extra data after the closing ']'")
    return rows


def _read_parquet(path: Path) -> list[_RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        rows = table.to_pylist()
    except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    return [_RawRow(f"{path}#row {i}", row) for i, row in enumerate(rows)]


def is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file()
                                 for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_datasets_dir(path: Path, split: str | None) -> list[_RawRow]:
    try:
        import datasets  # optional dependency, imported only here
    except ImportError:
        raise DataError(f"{path} is a Hugging Face `datasets` directory; reading it needs the optional "
                        "package: pip install 'chatsmith[datasets]' (or export it to JSONL/Parquet)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for unreadable directories
        raise DataError(f"{path}: cannot load the datasets directory: {type(exc).__name__}: {exc}") from None
    if isinstance(ds, dict):  # DatasetDict is a dict of split name -> Dataset
        splits = sorted(ds)
        if split is None:
            if "train" in ds:
                split = "train"
            elif len(splits) == 1:
                split = splits[0]
            else:
                raise DataError(f"{path}: holds several splits {splits}; choose one with split=")
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; it has {splits}")
        ds = ds[split]
        where = f"{path}[{split}]"
    else:
        where = str(path)
    try:
        return [_RawRow(f"{where}#row {i}", row) for i, row in enumerate(ds)]
    except Exception as exc:
        raise DataError(f"{path}: cannot read rows: {type(exc).__name__}: {exc}") from None


def read_rows(path: str | Path, split: str | None = None) -> list[_RawRow]:
    """Raw rows of a file (values not yet validated), each with its origin."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        if is_datasets_dir(path):
            return _read_datasets_dir(path, split)
        raise DataError(f"{path}: is a directory but not a saved `datasets` directory (no dataset_info.json "
                        "or dataset_dict.json); pass a .jsonl, .json or .parquet file")
    name = path.name.lower()
    base = Path(name[:-3] if name.endswith(".gz") else name).suffix   # "x.jsonl.gz" -> ".jsonl"
    if base in (".parquet", ".pq"):
        return _read_parquet(path)
    data = _open_bytes(path)
    if base in (".jsonl", ".ndjson"):
        return _read_jsonl(path, data)
    if base == ".json":
        return _read_json(path, data)
    # Unknown extension: sniff.
    if data.startswith(b"PAR1"):
        return _read_parquet(path)
    head = data.lstrip()[:1]
    if head == b"[":
        return _read_json(path, data)
    if head == b"{":
        return _read_jsonl(path, data) if b"\n" in data.strip() and _first_line_is_object(data) \
            else _read_json(path, data)
    if not data.strip():
        return []
    raise DataError(f"{path}: unknown file type; expected .jsonl, .json, .parquet or a datasets directory")


def _first_line_is_object(data: bytes) -> bool:
    first = data.lstrip().split(b"\n", 1)[0]
    try:
        return isinstance(json.loads(first.decode("utf-8")), dict)
    except (ValueError, RecursionError):
        return False


# ----------------------------------------------------------------------------- format detection

def _present(record: dict) -> set[str]:
    return {k for k, v in record.items() if v is not None}


def _detect(record: Any) -> str | None:
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


def _format_help() -> str:
    return "; ".join(f"{name}: {ex}" for name, ex in FORMAT_EXAMPLES.items())


def detect_format(record: dict) -> str:
    """The format of one row (see the module docstring); DataError if no known key is present."""
    found = _detect(record)
    if found is None:
        what = f"keys {sorted(map(str, record))[:10]}" if isinstance(record, dict) else _type_name(record)
        raise DataError(f"cannot tell the format of a row with {what}. Expected one of: {_format_help()}. "
                        "Pass --format to choose one.")
    return found


def normalize_format(name: str) -> str:
    key = name.strip().lower().replace(" ", "_")
    key = FORMAT_ALIASES.get(key, key)
    if key not in FORMATS:
        raise DataError(f"unknown data format {name!r}; expected one of {', '.join(FORMATS)}")
    return key


def _detect_file_format(rows: list[_RawRow], path: Path) -> str:
    votes: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    first_unknown: Any = None
    looked = 0
    for raw in rows:
        if raw.error is not None:
            continue
        looked += 1
        fmt = _detect(raw.value)
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
        what = f"keys {sorted(map(str, value))[:10]}" if isinstance(value, dict) else _type_name(value)
        raise DataError(f"{first_unknown.origin}: cannot tell the data format from a row with {what}. "
                        f"Expected one of: {_format_help()}. Pass --format to choose one.")
    return "unknown"   # no readable row at all: every row is bad (reported below)


# ----------------------------------------------------------------------------- row validation

def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _text(value: Any, where: str, *, allow_empty: bool = True) -> str:
    """A string field; content given as OpenAI-style text parts is joined."""
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for i, part in enumerate(value):
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise _RowError(WRONG_TYPE, f"{where}[{i}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                "are supported")
            parts.append(part["text"])
        value = "".join(parts)
    if value is None:
        raise _RowError(MISSING, f"{where} is missing")
    if not isinstance(value, str):
        raise _RowError(WRONG_TYPE, f"{where} should be a string, got {_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates such as "\ud800" decode from JSON but break tokenizers
        raise _RowError(WRONG_TYPE, f"{where} holds invalid Unicode (a lone surrogate escape)") from None
    if not allow_empty and not value.strip():
        raise _RowError(EMPTY, f"{where} is empty")
    return value


def _messages(value: Any, where: str, *, role_key: str = "role", content_key: str = "content",
              role_map: dict[str, str] | None = None) -> list[dict]:
    if value is None:
        raise _RowError(MISSING, f"missing field {where!r}")
    if not isinstance(value, list):
        raise _RowError(WRONG_TYPE, f"field {where!r} should be a list of messages, got {_type_name(value)}")
    if not value:
        raise _RowError(EMPTY, f"field {where!r} is an empty list")
    out = []
    for i, msg in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(msg, dict):
            raise _RowError(WRONG_TYPE, f"{at} should be an object with {role_key!r} and {content_key!r}, "
                            f"got {_type_name(msg)}")
        keys_role, keys_content = role_key, content_key
        if role_map is not None and role_key not in msg and "role" in msg:   # ShareGPT files with role/content
            keys_role, keys_content = "role", "content"
        role = msg.get(keys_role)
        if role is None:
            raise _RowError(MISSING, f"{at} has no {keys_role!r}")
        if not isinstance(role, str):
            raise _RowError(WRONG_TYPE, f"{at}.{keys_role} should be a string, got {_type_name(role)}")
        if role_map is not None:
            mapped = role_map.get(role.strip().lower())
            if mapped is None:
                raise _RowError(UNKNOWN_ROLE, f"{at}: unknown role {role!r}; expected one of "
                                f"{', '.join(sorted(role_map))}")
        else:
            if role not in ROLES:
                raise _RowError(UNKNOWN_ROLE, f"{at}: unknown role {role!r}; expected system, user or assistant")
            mapped = role
        if keys_content not in msg or msg[keys_content] is None:
            raise _RowError(EMPTY if mapped == "assistant" else MISSING, f"{at} ({mapped}) has no {keys_content!r}")
        content = _text(msg[keys_content], f"{at}.{keys_content}")
        if mapped == "assistant" and not content.strip():
            raise _RowError(EMPTY, f"{at}: empty assistant reply")
        out.append({"role": mapped, "content": content})
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
        raise _RowError(MISSING, f"missing field {where!r}")
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, f"field {where!r}", allow_empty=False)}]
    msgs = _messages(value, where)
    if msgs[-1]["role"] != "user":
        raise _RowError(NO_USER, f"field {where!r} should end with a user message, ends with {msgs[-1]['role']}")
    return msgs


def _response(value: Any, where: str) -> tuple[list[dict] | None, str]:
    """A reply: string, {"role": "assistant", "content"} object or a conversation ending with it.
    Returns (the conversation before the reply or None, reply text)."""
    if value is None:
        raise _RowError(MISSING, f"missing field {where!r}")
    if isinstance(value, str):
        return None, _text(value, f"field {where!r}", allow_empty=False)
    if isinstance(value, dict):
        msgs = _messages([value], where)
        if msgs[0]["role"] != "assistant":
            raise _RowError(WRONG_TYPE, f"field {where!r} should be an assistant message, got role "
                            f"{msgs[0]['role']!r}")
        return None, msgs[0]["content"]
    if isinstance(value, list):
        msgs = _messages(value, where)
        if msgs[-1]["role"] != "assistant":
            raise _RowError(NO_ASSISTANT, f"field {where!r} should end with an assistant message, ends with "
                            f"{msgs[-1]['role']}")
        return (msgs[:-1] or None), msgs[-1]["content"]
    raise _RowError(WRONG_TYPE, f"field {where!r} should be a string or a list of messages, got {_type_name(value)}")


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
                raise _RowError(WRONG_TYPE, f"field {where!r} is a conversation that does not start with the prompt")
        return prompt
    given = [(w, c) for w, c in contexts if c is not None]
    if not given or len(given) != len(contexts):
        raise _RowError(MISSING, "missing field 'prompt' (or give every response as a conversation that "
                        "includes the prompt)")
    first_where, first = given[0]
    for where, ctx in given[1:]:
        if not _same_messages(ctx, first):
            raise _RowError(WRONG_TYPE, f"fields {first_where!r} and {where!r} differ before their final reply, "
                            "so the prompt is ambiguous; add a 'prompt' field")
    if first[-1]["role"] != "user":
        raise _RowError(NO_USER, f"the conversation in {first_where!r} should have a user message before the reply")
    return _with_system(record, first)


def _check_distinct(responses: list[str], names: list[str]) -> None:
    seen: dict[str, str] = {}
    for text, name in zip(responses, names):
        key = text.strip()
        if key in seen:
            raise _RowError(IDENTICAL, f"{seen[key]} and {name} are identical; a preference needs different responses")
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
        raise _RowError(MISSING, "missing field 'ranked' (or 'responses' with 'ranking' or 'scores')")
    if not isinstance(items, list):
        raise _RowError(WRONG_TYPE, f"field {key!r} should be a list of responses, got {_type_name(items)}")
    if len(items) < 2:
        raise _RowError(BAD_RANKING, f"field {key!r} needs at least 2 responses, got {len(items)}")
    parsed = [_response(item, f"{key}[{i}]") for i, item in enumerate(items)]
    order = list(range(len(items)))
    if key == "responses":
        if record.get("ranking") is not None:
            ranking = record["ranking"]
            if (not isinstance(ranking, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in ranking)):
                raise _RowError(WRONG_TYPE, "field 'ranking' should be a list of 0-based response indices, best first")
            if sorted(ranking) != order:
                raise _RowError(BAD_RANKING, f"field 'ranking' should list each of the {len(items)} response indices "
                                f"0..{len(items) - 1} once, best first; got {ranking}")
            order = list(ranking)
        elif record.get("scores") is not None:
            scores = record["scores"]
            if (not isinstance(scores, list) or len(scores) != len(items)
                    or any(isinstance(s, bool) or not isinstance(s, (int, float)) or s != s for s in scores)):
                raise _RowError(WRONG_TYPE, f"field 'scores' should be a list of {len(items)} numbers")
            if len(set(scores)) != len(scores):
                raise _RowError(BAD_RANKING, "field 'scores' has ties; the order of tied responses is unknown")
            order = sorted(order, key=lambda i: -scores[i])
        else:
            raise _RowError(MISSING, "field 'responses' needs 'ranking' (indices best first) or 'scores'")
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
            raise _RowError(EMPTY, "field 'instruction' is empty")
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
            raise _RowError(MISSING, "missing field 'completion'")
        if isinstance(completion, str):
            reply = [{"role": "assistant", "content": _text(completion, "field 'completion'", allow_empty=False)}]
        elif isinstance(completion, dict):
            reply = _messages([completion], "completion")
        elif isinstance(completion, list):
            reply = _messages(completion, "completion")
            if len(reply) > len(prompt) and _same_messages(reply[:len(prompt)], prompt):
                reply = reply[len(prompt):]   # the completion repeats the prompt
        else:
            raise _RowError(WRONG_TYPE, f"field 'completion' should be a string or a list of messages, got "
                            f"{_type_name(completion)}")
        return _with_system(record, prompt + reply)
    raise AssertionError(fmt)


_USED_KEYS = {"messages": {"messages"}, "sharegpt": {"conversations", "system"},
              "alpaca": {"instruction", "input", "output", "system"},
              "prompt_completion": {"prompt", "completion", "system"}, "text": {"text"},
              "preference": {"prompt", "chosen", "rejected", "system"},
              "ranked": {"prompt", "ranked", "responses", "ranking", "scores", "system"}}


def _convert(record: Any, fmt: str, kind: str, origin: str) -> Example:
    if not isinstance(record, dict):
        raise _RowError(NOT_OBJECT, f"expected a JSON object (one row), got {_type_name(record)}")
    record = {k: v for k, v in record.items() if v is not None}
    meta = {k: v for k, v in record.items() if k not in _USED_KEYS[fmt]}
    if fmt == "text":
        return TextExample(_text(record.get("text"), "field 'text'", allow_empty=False), origin, meta)
    if fmt in ("preference", "ranked"):
        # Pairwise and ranked rows mix freely in one file (the built-in world writes both).
        own = _detect(record)
        shape = own if own in ("preference", "ranked") else fmt
        prompt, responses = (_parse_preference if shape == "preference" else _parse_ranked)(record)
        if kind == "preference":
            return PreferenceExample(prompt, responses, origin, meta)
        if kind == "chat":
            return ChatExample(prompt + [{"role": "assistant", "content": responses[0]}], origin, meta)
        return ChatExample(prompt, origin, meta)   # kind == "prompt"
    messages = _parse_chat(record, fmt, need_reply=(kind == "chat"))
    if kind == "chat":
        if not any(m["role"] == "assistant" for m in messages):
            raise _RowError(NO_ASSISTANT, "conversation has no assistant turn (nothing to learn from)")
        return ChatExample(messages, origin, meta)
    # kind == "prompt": everything up to and including the last user message
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user < 0:
        raise _RowError(NO_USER, "conversation has no user message to use as a prompt")
    return ChatExample(messages[:last_user + 1], origin, meta)


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


def _natural_kind(rows: list[_RawRow], fmt: str) -> str:
    """The format's own kind; a chat file whose rows mostly end with a user turn is a prompt file."""
    kind = NATURAL_KIND.get(fmt, "chat")
    if kind == "chat":
        sample = [raw.value for raw in rows if raw.error is None][:DETECT_ROWS]
        if sample and sum(_ends_with_prompt(v, fmt) for v in sample) * 2 > len(sample):
            return "prompt"
    return kind


def _kind_error(path: Path, fmt: str, kind: str) -> DataError:
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


def load_examples(path: str | Path, format: str | None = None, on_bad_row: str = "error",
                  kind: str | None = None, *, split: str | None = None, allow_empty: bool = False) -> LoadResult:
    """Read and validate a data file (see the module docstring for files, formats and kinds).

    Raises DataError for unreadable files, a format that cannot be detected, a kind the format cannot
    provide, bad rows when `on_bad_row="error"`, or (unless `allow_empty`) a file with no usable row.
    """
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if kind is not None and kind not in KINDS:
        raise DataError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    path = Path(path)
    rows = read_rows(path, split=split)
    if format is not None:
        fmt, detected = normalize_format(format), False
    else:
        fmt, detected = _detect_file_format(rows, path), True
    target = kind or _natural_kind(rows, fmt)
    if fmt != "unknown" and fmt not in ALLOWED_FORMATS[target]:
        raise _kind_error(path, fmt, target)

    result = LoadResult(path=str(path), format=fmt, kind=target, rows_read=len(rows), format_detected=detected)
    for raw in rows:
        if raw.error is not None:
            result.bad_rows.append(BadRow(raw.origin, raw.error[1], raw.error[0]))
            continue
        try:
            if fmt == "unknown":
                raise _RowError(UNKNOWN_FORMAT, "row format unknown")
            result.examples.append(_convert(raw.value, fmt, target, raw.origin))
        except _RowError as exc:
            reason = exc.reason
            own = _detect(raw.value)
            if exc.category == MISSING and own is not None and own != fmt:
                reason += f" (this row looks like {own} data, but the file is read as {fmt})"
            result.bad_rows.append(BadRow(raw.origin, reason, exc.category))
        except Exception as exc:  # never show a traceback for user data; tests assert this stays unused
            result.bad_rows.append(BadRow(raw.origin, f"could not read this row ({type(exc).__name__}: {exc})",
                                          UNEXPECTED))

    if result.bad_rows and on_bad_row == "error":
        raise DataError(f"{path}: {len(result.bad_rows)} bad row(s) out of {len(rows)} (format {fmt}):\n"
                        f"{format_bad_rows(result.bad_rows)}\n"
                        "Fix them, or skip them with --on-bad-row skip (on_bad_row='skip').")
    if not result.examples and not allow_empty:
        detail = f" ({result.skipped} bad)" if result.bad_rows else ""
        raise DataError(f"{path}: no usable rows{detail}; expected e.g. {FORMAT_EXAMPLES.get(fmt, _format_help())}")
    return result


# ----------------------------------------------------------------------------- max length

@dataclass
class FitResult:
    """`status`: "kept" (fits), "truncated" (cut after an assistant turn) or "dropped" (ids/mask empty)."""
    input_ids: list[int]
    loss_mask: list[int]
    status: str


def assistant_turn_ends(loss_mask: Sequence[int]) -> list[int]:
    """Token positions just after each run of mask==1, i.e. where an assistant reply (with its end-of-turn
    token(s), which render_chat masks in) ends. Cutting there keeps whole user+assistant exchanges."""
    ends = []
    for i, m in enumerate(loss_mask):
        if m and (i + 1 == len(loss_mask) or not loss_mask[i + 1]):
            ends.append(i + 1)
    return ends


def fit_to_length(input_ids: Sequence[int], loss_mask: Sequence[int], turn_boundaries: Sequence[int] | None,
                  max_len: int, policy: str = "truncate") -> FitResult:
    """Make a tokenized conversation fit in `max_len` tokens.

    `input_ids`, `loss_mask`: `(t,)` from `chatsmith.chat.render.render_chat`. `turn_boundaries`: allowed
    cut positions (token counts); None = `assistant_turn_ends(loss_mask)`, which needs no re-rendering
    because render_chat's mask marks every assistant reply and its end-of-turn token. policy "truncate"
    keeps the longest prefix ending at a boundary <= max_len that still has an assistant token (dropped
    if none does); policy "drop" drops every over-long conversation.
    """
    if policy not in ("truncate", "drop"):
        raise DataError(f"length policy must be 'truncate' or 'drop', got {policy!r}")
    if len(input_ids) != len(loss_mask):
        raise ValueError(f"input_ids ({len(input_ids)}) and loss_mask ({len(loss_mask)}) differ in length")
    if len(input_ids) <= max_len:
        return FitResult(list(input_ids), list(loss_mask), "kept")
    if policy == "truncate":
        bounds = assistant_turn_ends(loss_mask) if turn_boundaries is None else turn_boundaries
        cuts = [b for b in bounds if 0 < b <= max_len and any(loss_mask[:b])]
        if cuts:
            cut = max(cuts)
            return FitResult(list(input_ids[:cut]), list(loss_mask[:cut]), "truncated")
    return FitResult([], [], "dropped")
