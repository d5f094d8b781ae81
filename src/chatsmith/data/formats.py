"""Read user data files (JSONL, JSON, Parquet, saved `datasets`) into validated examples, and fit lengths.

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

Row formats, kinds and validation: see `chatsmith.data.records` (detection and conversion of each
row into a TextExample / ChatExample / PreferenceExample, and the BadRow of a row that is not one).

Over-long tokenized conversations: `fit_to_length(ids, mask, turn_boundaries, max_len, policy)` cuts
at the end of an assistant turn (so whole user+assistant exchanges are kept) or drops the example.

Preference stages (`chatsmith reward`, `chatsmith dpo`) read their files with `load_preferences` and
hold out the same examples with `split_train_eval`.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from chatsmith.data.records import (ALLOWED_FORMATS, BROKEN_JSON, FORMAT_EXAMPLES, KINDS, MISSING,
                                    UNEXPECTED, UNKNOWN_FORMAT, BadRow, RawRow, RowError, convert_record,
                                    detect_file_format, detect_row_format, format_bad_rows, format_help,
                                    kind_error, natural_kind, normalize_format, type_name)
from chatsmith.errors import ChatsmithError, DataError


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
    """json.loads that turns every failure into RowError (huge ints and deep nesting raise other types)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowError(BROKEN_JSON, f"broken JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise RowError(BROKEN_JSON, "broken JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more than 4300 digits
        raise RowError(BROKEN_JSON, f"broken JSON: {exc}") from None


def _read_jsonl(path: Path, data: bytes) -> list[RawRow]:
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        origin = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append(RawRow(origin, error=(BROKEN_JSON, f"not valid UTF-8 (byte {exc.start})")))
            continue
        try:
            rows.append(RawRow(origin, _parse_json_text(text)))
        except RowError as exc:
            rows.append(RawRow(origin, error=(exc.category, exc.reason)))
    return rows


def _read_json(path: Path, data: bytes) -> list[RawRow]:
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
        return [RawRow(f"{path}#row {i}", row) for i, row in enumerate(value["data"])]
    if isinstance(value, dict):
        # A single row object on its own: accept it as a one-row file rather than refusing.
        if detect_row_format(value) is not None:
            return [RawRow(f"{path}:1", value)]
        raise DataError(f"{path}: expected a list of rows or {{\"data\": [rows]}}, got an object with keys "
                        f"{sorted(value)[:10]}")
    raise DataError(f"{path}: expected a list of rows or {{\"data\": [rows]}}, got {type_name(value)}")


def _read_json_array(path: Path, text: str, start: int) -> list[RawRow]:
    """Parse a top-level JSON array element by element so each row knows its line number."""
    decoder = json.JSONDecoder()
    rows: list[RawRow] = []
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
            rows.append(RawRow(f"{path}:{line_at(pos)}", value))
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


def _read_parquet(path: Path) -> list[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        rows = table.to_pylist()
    except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    return [RawRow(f"{path}#row {i}", row) for i, row in enumerate(rows)]


def is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file()
                                 for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_datasets_dir(path: Path, split: str | None) -> list[RawRow]:
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
        return [RawRow(f"{where}#row {i}", row) for i, row in enumerate(ds)]
    except Exception as exc:
        raise DataError(f"{path}: cannot read rows: {type(exc).__name__}: {exc}") from None


def read_rows(path: str | Path, split: str | None = None) -> list[RawRow]:
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


# ----------------------------------------------------------------------------- loading

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
        fmt, detected = detect_file_format(rows, path), True
    target = kind or natural_kind(rows, fmt)
    if fmt != "unknown" and fmt not in ALLOWED_FORMATS[target]:
        raise kind_error(path, fmt, target)

    result = LoadResult(path=str(path), format=fmt, kind=target, rows_read=len(rows), format_detected=detected)
    for raw in rows:
        if raw.error is not None:
            result.bad_rows.append(BadRow(raw.origin, raw.error[1], raw.error[0]))
            continue
        try:
            if fmt == "unknown":
                raise RowError(UNKNOWN_FORMAT, "row format unknown")
            result.examples.append(convert_record(raw.value, fmt, target, raw.origin))
        except RowError as exc:
            reason = exc.reason
            own = detect_row_format(raw.value)
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
        raise DataError(f"{path}: no usable rows{detail}; expected e.g. {FORMAT_EXAMPLES.get(fmt, format_help())}")
    return result



def load_preferences(path: str, what: str, on_bad_row: str = "error") -> list[Any]:
    """The PreferenceExamples of a file; `what` names the flag it came from in errors ("--data")."""
    from chatsmith.utils import note

    if not Path(path).exists():
        raise ChatsmithError(f"{what} {path}: file not found")
    result = load_examples(path, kind="preference", on_bad_row=on_bad_row)
    if result.bad_rows:
        note(f"{path}: {result.summary()}")
    if not result.examples:
        raise DataError(f"{path}: no preference examples found ({result.summary()})")
    return list(result.examples)


def split_train_eval(n: int, eval_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic held-out split of `n` examples: `(train_indices, eval_indices)`, both sorted.

    The split depends only on (n, eval_fraction, seed), so a resumed run or another stage (DPO) given the
    same data holds out the same examples. At least one example is held out when eval_fraction > 0 and
    n >= 2.
    """
    import numpy as np

    if not 0.0 <= eval_fraction < 1.0:
        raise ChatsmithError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, n - 1) if n > 1 else 0
    order = np.random.default_rng([seed, n, 7919]).permutation(n)
    return sorted(order[n_eval:].tolist()), sorted(order[:n_eval].tolist())



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
