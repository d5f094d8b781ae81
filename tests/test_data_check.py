"""`chatsmith data check FILE` through the real CLI entry point.

Run: python -m pytest tests/test_data_check.py -q
"""

from __future__ import annotations

import re

import pytest
from conftest import make_tokenizer, write_jsonl

from chatsmith.cli import main
from chatsmith.data.check import percentile

U = {"role": "user", "content": "What is the capital of France?"}
A = {"role": "assistant", "content": "Paris is the capital of France."}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer().save_pretrained(str(path))
    return str(path)


def conversations(n_turns_list):
    rows = []
    for n in n_turns_list:
        msgs = []
        for i in range(n):
            msgs += [{"role": "user", "content": f"Question {i}: what is the capital of Germany?"},
                     {"role": "assistant", "content": f"Answer {i}: Berlin is the capital of Germany."}]
        rows.append({"messages": msgs})
    return rows


def test_clean_file_passes(tmp_path, capsys):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [U, A]}] * 3)
    assert main(["data", "check", path]) == 0
    out = capsys.readouterr().out
    assert "format:  messages (auto-detected), used as chat data" in out
    assert "rows:    3 read, 3 usable, 0 bad" in out
    assert "result:  OK" in out


def test_bad_rows_listed_with_line_and_exit_1(tmp_path, capsys):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [U, A]}, "{oops", {"messages": [U]},
                                                 {"messages": [U, {"role": "bot", "content": "x"}]}])
    assert main(["data", "check", path]) == 1
    out = capsys.readouterr().out
    assert "rows:    4 read, 1 usable, 3 bad" in out
    assert f"{path}:2: broken JSON" in out
    assert f"{path}:3: conversation has no assistant turn" in out
    assert f"{path}:4: messages[1]: unknown role 'bot'" in out
    assert "FAILED (3 bad rows" in out
    # with skip, the same rows are listed but the file is usable
    assert main(["data", "check", path, "--on-bad-row", "skip"]) == 0
    out = capsys.readouterr().out
    assert f"{path}:2: broken JSON" in out and "3 bad rows would be skipped" in out
    assert main(["data", "check", path, "--show-bad", "1"]) == 1
    assert "... and 2 more" in capsys.readouterr().out


def test_format_override_and_file_errors(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "completion": "Hello there."}])
    assert main(["data", "check", path, "--format", "prompt_completion", "--kind", "prompt"]) == 0
    assert "prompt_completion (given), used as prompt data" in capsys.readouterr().out
    assert main(["data", "check", path, "--format", "chatty"]) == 2
    assert "unknown data format 'chatty'" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path / "missing.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["data", "check", path, "--kind", "text"]) == 2
    assert "cannot be used as text data" in capsys.readouterr().err


def test_token_lengths_and_max_len_counts(tmp_path, capsys, tokenizer_dir):
    from chatsmith.chat.render import render_chat
    from chatsmith.data.formats import fit_to_length, load_examples
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / "sft.jsonl", conversations([1, 1, 2, 3, 4, 6]))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rendered = [render_chat(ex.messages, tok, "chatml") for ex in load_examples(path).examples]
    lengths = sorted(len(r.input_ids) for r in rendered)
    max_len = lengths[2] + 1     # the two single-turn conversations and one more fit
    statuses = [fit_to_length(r.input_ids, r.assistant_mask, None, max_len, "truncate").status for r in rendered]
    assert statuses.count("truncated") == 3    # sanity: multi-turn ones are cut at a turn boundary

    code = main(["data", "check", path, "--tokenizer", tokenizer_dir, "--template", "chatml",
                 "--max-len", str(max_len)])
    out = capsys.readouterr().out
    assert code == 0, out
    line = re.search(r"token lengths \(conversations, template chatml\): (.*)", out).group(1)
    assert line.startswith(f"min {lengths[0]}  median {percentile(lengths, 50)}  ")
    assert f"max {lengths[-1]}  (n=6)" in line
    assert (f"max length {max_len}: 3 of 6 conversations are longer; truncate: 3 truncated at a turn "
            f"boundary, 0 dropped") in out
    # a max length below the first exchange drops instead
    code = main(["data", "check", path, "--tokenizer", tokenizer_dir, "--template", "chatml", "--max-len", "5"])
    assert "6 of 6 conversations are longer; truncate: 0 truncated at a turn boundary, 6 dropped" in \
        capsys.readouterr().out


def test_token_lengths_for_text_and_preferences(tmp_path, capsys, tokenizer_dir):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "Paris is in France."}, {"text": "Hello " * 30}])
    assert main(["data", "check", corpus, "--tokenizer", tokenizer_dir, "--max-len", "10"]) == 0
    out = capsys.readouterr().out
    assert "token lengths (documents): min " in out and "1 of 2 documents are longer" in out
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Hi", "chosen": "Hello, how can I help you today?",
                                                    "rejected": "lol idk"},
                                                   {"prompt": "Hi", "ranked": ["Hello!", "hi", "what"]}])
    assert main(["data", "check", prefs, "--tokenizer", tokenizer_dir, "--template", "chatml"]) == 0
    assert "(n=5)" in capsys.readouterr().out          # 2 + 3 prompt+response sequences


def test_unknown_template_is_reported(tmp_path, capsys, tokenizer_dir):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [U, A]}])
    assert main(["data", "check", path, "--tokenizer", tokenizer_dir, "--template", "nope"]) == 1
    assert "cannot use the chat template" in capsys.readouterr().out
    assert main(["data", "check", path, "--template", "chatml"]) == 0
    assert "give --tokenizer DIR" in capsys.readouterr().out


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert [percentile(values, q) for q in (0, 50, 90, 99, 100)] == [1, 50, 90, 99, 100]
    assert percentile([7], 99) == 7


def test_without_for_the_stage_of_the_data_kind_is_assumed(tmp_path, capsys, tokenizer_dir):
    path = write_jsonl(tmp_path / "sft.jsonl", conversations([1, 2]))
    code = main(["data", "check", path, "--tokenizer", tokenizer_dir, "--template", "chatml", "--max-len", "5"])
    out = capsys.readouterr().out
    assert code == 1, out                      # sft would drop every conversation and refuse the file
    assert "sft rules (--max-len 5, --overlength truncate): 0 conversations kept" in out
    assert "result:  FAILED (`chatsmith sft` would refuse this file)" in out
    code = main(["data", "check", path, "--tokenizer", tokenizer_dir, "--template", "chatml", "--max-len", "5",
                 "--for", "pretrain"])
    assert code == 2 and "cannot be used as text data" in capsys.readouterr().err    # read as pretrain reads
