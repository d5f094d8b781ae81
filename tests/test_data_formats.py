"""Reading, detecting, converting and validating user data files (chatsmith.data.formats).

Run: python -m pytest tests/test_data_formats.py -q
"""

from __future__ import annotations

import json
import sys
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsmith.data.formats import assistant_turn_ends, fit_to_length, load_examples
from chatsmith.data.records import UNEXPECTED, ChatExample, PreferenceExample, TextExample, detect_format
from chatsmith.errors import DataError

U = {"role": "user", "content": "What is the capital of France?"}
A = {"role": "assistant", "content": "Paris."}
S = {"role": "system", "content": "Be brief."}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- formats

CHAT_CASES = [
    ("messages", {"messages": [S, U, A]}, [S, U, A]),
    ("messages", {"messages": [U, {"role": "assistant", "content": [{"type": "text", "text": "Par"},
                                                                     {"type": "text", "text": "is."}]}]}, [U, A]),
    ("sharegpt", {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": U["content"]},
                                    {"from": "gpt", "value": "Paris."}]}, [S, U, A]),
    ("sharegpt", {"system": "Be brief.", "conversations": [{"from": "human", "value": U["content"]},
                                                           {"from": "gpt", "value": "Paris."}]}, [S, U, A]),
    ("alpaca", {"instruction": U["content"], "input": "", "output": "Paris."}, [U, A]),
    ("alpaca", {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": "Be brief."},
     [S, {"role": "user", "content": "Translate.\n\nBonjour"}, {"role": "assistant", "content": "Hello"}]),
    ("prompt_completion", {"prompt": U["content"], "completion": "Paris."}, [U, A]),
    ("prompt_completion", {"prompt": [S, U], "completion": [S, U, A]}, [S, U, A]),
    ("preference", {"prompt": U["content"], "chosen": "Paris.", "rejected": "lol idk"}, [U, A]),
    ("ranked", {"prompt": [U], "ranked": ["Paris.", "It is Paris, I think.", "idk"]}, [U, A]),
]


@pytest.mark.parametrize("fmt,row,messages", CHAT_CASES)
def test_every_chat_format_is_detected_and_converted(tmp_path, fmt, row, messages):
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    assert detect_format(row) == fmt
    result = load_examples(path, kind="chat")
    assert result.format == fmt and result.format_detected
    assert [type(e) for e in result.examples] == [ChatExample, ChatExample]
    assert result.examples[0].messages == messages
    assert result.examples[1].origin == f"{path}:2"
    assert load_examples(path, format=fmt, kind="chat").examples[0].messages == messages


def test_text_format_and_meta(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "Paris is in France.", "id": 7}])
    result = load_examples(path)
    assert result.kind == "text"
    assert result.examples == [TextExample("Paris is in France.", f"{path}:1", {"id": 7})]


def test_preference_shapes_and_pairs(tmp_path):
    rows = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "what"},
        # chosen/rejected as message lists repeating the prompt: the final assistant turn is taken
        {"prompt": [S, {"role": "user", "content": "Hi"}],
         "chosen": [S, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "what"}]},
        # no prompt: the shared conversation before the final replies is the prompt
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "what"}]},
    ]
    result = load_examples(write_jsonl(tmp_path / "p.jsonl", rows))
    assert result.format == "preference" and result.kind == "preference"
    prompts = [e.prompt for e in result.examples]
    assert prompts == [[{"role": "user", "content": "Hi"}], [S, {"role": "user", "content": "Hi"}],
                       [{"role": "user", "content": "Hi"}]]
    assert all(e.responses == ["Hello!", "what"] for e in result.examples)
    assert result.examples[0].pairs() == [(0, 1)]
    # pairwise and ranked rows mix in one file (the built-in world writes both)
    mixed = load_examples(write_jsonl(tmp_path / "m.jsonl", rows[:1] + [{"prompt": "Hi", "ranked": ["a", "b", "c"]}]))
    assert [len(e.responses) for e in mixed.examples] == [2, 3]


def test_ranked_shapes(tmp_path):
    rows = [
        {"prompt": "Hi", "ranked": ["a", "b", "c", "d"]},
        {"prompt": "Hi", "responses": ["c", "a", "d", "b"], "ranking": [1, 3, 0, 2]},
        {"prompt": "Hi", "responses": ["c", "a", "d", "b"], "scores": [0.5, 3, -1, 2.5]},
    ]
    result = load_examples(write_jsonl(tmp_path / "r.jsonl", rows))
    assert result.format == "ranked"
    for ex in result.examples:
        assert isinstance(ex, PreferenceExample)
        assert ex.responses == ["a", "b", "c", "d"]
        assert len(ex.pairs()) == 6 and all(i < j for i, j in ex.pairs())


def test_kinds_convert_or_refuse(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [U, A, {"role": "user", "content": "And Italy?"},
                                                               {"role": "assistant", "content": "Rome."}]}])
    with pytest.raises(DataError, match="cannot be used as text data"):
        load_examples(chat, kind="text")
    with pytest.raises(DataError, match="cannot be used as preference"):
        load_examples(chat, kind="preference")
    prompt = load_examples(chat, kind="prompt").examples[0]
    assert prompt.messages[-1] == {"role": "user", "content": "And Italy?"} and len(prompt.messages) == 3
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="cannot be used as chat data"):
        load_examples(corpus, kind="chat")
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "what"}])
    assert load_examples(prefs, kind="chat").examples[0].messages == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert load_examples(prefs, kind="prompt").examples[0].messages == [{"role": "user", "content": "Hi"}]
    # a prompt-only file (RL prompts) works as prompts but not as chat
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [U], "id": "q1", "category": "fact"}])
    assert load_examples(prompts).kind == "prompt"      # rows ending with a user turn: a prompt file
    ex = load_examples(prompts, kind="prompt").examples[0]
    assert ex.messages == [U] and ex.meta == {"id": "q1", "category": "fact"}
    with pytest.raises(DataError, match="no assistant turn"):
        load_examples(prompts, kind="chat")


# ----------------------------------------------------------------------------- files

def test_json_list_with_line_numbers_and_data_wrapper(tmp_path):
    rows = [{"messages": [U, A]}, {"messages": [U, {"role": "robot", "content": "x"}]}]
    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    result = load_examples(path, on_bad_row="skip")
    assert [e.origin for e in result.examples] == [f"{path}:2"]
    assert [b.origin for b in result.bad_rows] == [f"{path}:3"] and "unknown role 'robot'" in result.bad_rows[0].reason
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": rows}))
    result = load_examples(wrapped, on_bad_row="skip")
    assert result.examples[0].origin == f"{wrapped}#row 0" and result.bad_rows[0].origin == f"{wrapped}#row 1"
    jsonl_named_json = write_jsonl(tmp_path / "lines.json", rows[:1] * 3)
    assert len(load_examples(jsonl_named_json).examples) == 3
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"text": "a"},\n{"text": "b"\n]')
    with pytest.raises(DataError, match=r"broken\.json:4: broken JSON"):
        load_examples(broken)


def test_parquet_rows_with_null_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mixed.parquet"
    table = pa.Table.from_pylist([
        {"instruction": "Say hi", "input": None, "output": "Hello!", "system": None},
        {"instruction": "Add", "input": "2 + 2", "output": "4", "system": "Be brief."},
        {"instruction": "Empty", "input": None, "output": "  ", "system": None},
    ])
    pq.write_table(table, path)
    result = load_examples(path, on_bad_row="skip")
    assert result.format == "alpaca"
    assert result.examples[0].messages == [{"role": "user", "content": "Say hi"},
                                           {"role": "assistant", "content": "Hello!"}]
    assert result.examples[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert result.bad_rows[0].origin == f"{path}#row 2" and "empty" in result.bad_rows[0].reason
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable Parquet"):
        load_examples(not_parquet)


def _datasets_dir(tmp_path):
    d = tmp_path / "saved"
    d.mkdir()
    (d / "dataset_info.json").write_text("{}")
    (d / "state.json").write_text("{}")
    return d


def test_datasets_dir_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)   # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"pip install 'chatsmith\[datasets\]'"):
        load_examples(_datasets_dir(tmp_path))


def test_datasets_dir_through_load_from_disk(tmp_path, monkeypatch):
    rows = [{"text": "a"}, {"text": ""}]
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: {"train": rows, "test": rows[:1]}   # a DatasetDict is a dict of splits
    monkeypatch.setitem(sys.modules, "datasets", fake)
    d = _datasets_dir(tmp_path)
    result = load_examples(d, on_bad_row="skip")
    assert [e.text for e in result.examples] == ["a"]
    assert result.bad_rows[0].origin == f"{d}[train]#row 1"
    assert len(load_examples(d, split="test").examples) == 1
    with pytest.raises(DataError, match="no split 'dev'"):
        load_examples(d, split="dev")


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="not a saved `datasets` directory"):
        load_examples(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(empty)
    assert load_examples(empty, allow_empty=True).rows_read == 0
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: cannot tell the data format.*--format"):
        load_examples(odd)
    with pytest.raises(DataError, match="unknown data format 'chatty'"):
        load_examples(odd, format="chatty")


# ----------------------------------------------------------------------------- bad rows

BAD_ROWS = [
    ('{"messages": [', "broken JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ({"messages": [U, {"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": [U, {"role": "assistant", "content": "   "}]}, "empty assistant reply"),
    ({"messages": [U, {"role": "assistant", "content": 42}]}, "should be a string, got a number"),
    ({"messages": [U]}, "no assistant turn"),
    ({"messages": "hello"}, "should be a list of messages"),
    ({"messages": [U, {"content": "x"}]}, "has no 'role'"),
    ({"instruction": "Say hi"}, "missing field 'messages' (this row looks like alpaca"),
]


def test_bad_rows_are_reported_with_line_and_reason(tmp_path):
    good = {"messages": [U, A]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good] + [row for row, _ in BAD_ROWS] + [good])
    with pytest.raises(DataError) as err:
        load_examples(path)
    message = str(err.value)
    assert f"{len(BAD_ROWS)} bad row(s) out of {len(BAD_ROWS) + 2}" in message
    assert "--on-bad-row skip" in message
    listed = [line for line in message.splitlines() if line.startswith(f"  {path}:")]
    assert len(listed) == 5 and listed[0].startswith(f"  {path}:2: broken JSON")
    assert f"and {len(BAD_ROWS) - 5} more" in message

    result = load_examples(path, on_bad_row="skip")
    assert len(result.examples) == 2 and result.rows_read == len(BAD_ROWS) + 2
    for bad, (_, expected), line in zip(result.bad_rows, BAD_ROWS, range(2, 100)):
        assert bad.origin == f"{path}:{line}"
        assert expected in bad.reason, (bad, expected)
    summary = result.summary()
    assert "format messages (auto-detected)" in summary
    assert f"rows read: {len(BAD_ROWS) + 2}   kept: 2   skipped: {len(BAD_ROWS)}" in summary
    assert "broken JSON: 1" in summary and "unknown role: 1" in summary
    result.record_fit("truncated")
    result.record_fit("dropped")
    result.record_fit("kept")
    assert "1 truncated at a turn boundary, 1 dropped" in result.summary()


def test_bad_preference_rows(tmp_path):
    rows = [
        {"prompt": "Hi", "chosen": "Same answer", "rejected": "Same answer"},
        {"prompt": "Hi", "chosen": "Hello"},
        {"prompt": "Hi", "ranked": ["only one"]},
        {"prompt": "Hi", "responses": ["a", "b"], "ranking": [0, 0]},
        {"prompt": "Hi", "responses": ["a", "b"], "scores": [1, 1]},
        {"prompt": [U, A], "chosen": "x", "rejected": "y"},
        {"chosen": [U, A], "rejected": [{"role": "user", "content": "Other"}, A]},
        {"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}], "rejected": "y"},
    ]
    expected = ["identical", "missing field 'rejected'", "at least 2 responses", "each of the 2 response indices",
                "ties", "should end with a user message", "differ before their final reply",
                "should end with an assistant message"]
    result = load_examples(write_jsonl(tmp_path / "p.jsonl", rows), on_bad_row="skip", allow_empty=True)
    assert not result.examples
    assert len(result.bad_rows) == len(rows)
    for bad, want in zip(result.bad_rows, expected):
        assert want in bad.reason, (bad, want)


def test_non_utf8_line_and_lone_surrogate(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n{"text": "\\ud800"}\n')
    result = load_examples(path, on_bad_row="skip")
    assert [b.origin for b in result.bad_rows] == [f"{path}:2", f"{path}:3"]
    assert "UTF-8" in result.bad_rows[0].reason and "surrogate" in result.bad_rows[1].reason


# ----------------------------------------------------------------------------- fuzzing

_keys = st.sampled_from(["messages", "conversations", "role", "content", "from", "value", "instruction", "input",
                         "output", "prompt", "completion", "text", "chosen", "rejected", "ranked", "responses",
                         "ranking", "scores", "system", "type", "data", "user", "assistant", "gpt", "human"])
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=5) | _keys,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=20)
_fuzz = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(rows=st.lists(_json, min_size=1, max_size=6), fmt=st.sampled_from([None, "messages", "preference", "ranked",
                                                                          "alpaca", "sharegpt"]),
       kind=st.sampled_from([None, "chat", "prompt", "preference"]), as_json_list=st.booleans())
def test_fuzz_json_rows_never_crash(tmp_path, rows, fmt, kind, as_json_list):
    if as_json_list:
        path = tmp_path / "fuzz.json"
        path.write_text(json.dumps(rows, indent=1))
    else:
        path = tmp_path / "fuzz.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        result = load_examples(path, format=fmt, kind=kind, on_bad_row="skip", allow_empty=True)
    except DataError:
        return
    assert not [b for b in result.bad_rows if b.category == UNEXPECTED], result.bad_rows
    assert len(result.examples) + len(result.bad_rows) == result.rows_read


@_fuzz
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json", ".parquet", ".txt", ".jsonl.gz"]))
def test_fuzz_random_bytes_never_crash(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        result = load_examples(path, on_bad_row="skip", allow_empty=True)
    except DataError:
        return
    assert not [b for b in result.bad_rows if b.category == UNEXPECTED], result.bad_rows


# ----------------------------------------------------------------------------- max length

def test_fit_to_length_cuts_after_whole_assistant_turns():
    # system/user (0) | reply 1 (1) | user (0) | reply 2 (1)
    mask = [0, 0, 0, 1, 1, 0, 0, 1, 1, 1]
    ids = list(range(100, 110))
    assert assistant_turn_ends(mask) == [5, 10]
    assert fit_to_length(ids, mask, None, 10).status == "kept"
    cut = fit_to_length(ids, mask, None, 8)
    assert cut.status == "truncated" and cut.input_ids == ids[:5] and cut.loss_mask == mask[:5]
    assert fit_to_length(ids, mask, None, 4).status == "dropped"       # not even the first reply fits
    assert fit_to_length(ids, mask, None, 8, policy="drop").status == "dropped"
    explicit = fit_to_length(ids, mask, [3, 5, 10], 9)                  # caller-given boundaries
    assert explicit.input_ids == ids[:5]
    with pytest.raises(DataError):
        fit_to_length(ids, mask, None, 8, policy="wrap")
