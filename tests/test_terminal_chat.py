"""Tests for `chatsmith chat` (chatsmith.generate.terminal): memory across turns, /reset, /exit, Ctrl-D,
system prompt, context guard, and a real subprocess fed through stdin (no TTY).

    python -m pytest tests/test_terminal_chat.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import chatsmith.generate.terminal as terminal
from chatsmith.generate.terminal import ChatConfig, fit_history
from chatsmith.model import build_tokenizer, create_model, save_model
from conftest import SAMPLE_TEXTS, run_chat_cli


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    tok = build_tokenizer(SAMPLE_TEXTS, 400, "chatml")
    torch.manual_seed(0)
    model = create_model(dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                              intermediate_size=64, max_position_embeddings=256), tok)
    return save_model(model, tok, tmp_path_factory.mktemp("chat") / "model")


def _expected_replies(model_dir, prompts, max_new_tokens, max_context=0):
    """What greedy generation replies to each rendered conversation (independently of chat_cli)."""
    from chatsmith.chat.render import render_prompt   # the real one: terminal.render_prompt may be a spy
    from chatsmith.generate import chat_sampling_config, generate
    from chatsmith.model import load_model

    loaded = load_model(model_dir, device="cpu")
    replies = []
    for messages in list(prompts):
        ids = render_prompt(messages, loaded.tokenizer, loaded.fmt)
        budget = max_context or 256
        if len(ids) + max_new_tokens > budget:   # a render the context guard rejected: not sent
            continue
        cfg = chat_sampling_config(loaded.fmt, loaded.tokenizer, temperature=0,
                                   max_new_tokens=min(max_new_tokens, budget - len(ids)))
        replies.append(generate(loaded.model, loaded.tokenizer, [ids], cfg).texts[0])
    return replies


def test_history_system_reset_and_exit(chat_model_dir, monkeypatch):
    cfg = ChatConfig(model=str(chat_model_dir), system="Be brief.", max_new_tokens=4, temperature=0)
    out, err, seen = run_chat_cli(cfg, "Hello there\n\nWhat did I say?\n/reset\nHi again\n/exit\nnever sent\n", monkeypatch)
    assert len(seen) == 3                               # the blank line and everything after /exit: not sent
    first, second, third = seen
    assert first == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    # memory: the second turn carries the first exchange, including the model's own reply
    assert second[:2] == first and second[2]["role"] == "assistant"
    assert second[3] == {"role": "user", "content": "What did I say?"}
    replies = _expected_replies(chat_model_dir, seen, 4)
    assert second[2]["content"] == replies[0].strip()
    # /reset forgot the conversation but kept the system prompt
    assert third == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi again"}]
    assert "history cleared" in err
    assert out == "".join(r + "\n" for r in replies)   # just the replies: no prompts when not a TTY


def test_ctrl_d_ends_and_replies_match_generate(chat_model_dir, monkeypatch):
    from chatsmith.chat.render import render_prompt
    from chatsmith.chat.templates import get_format
    from chatsmith.generate import chat_sampling_config, generate
    from chatsmith.model import load_model

    cfg = ChatConfig(model=str(chat_model_dir), max_new_tokens=6, temperature=0)
    out, _, seen = run_chat_cli(cfg, "What is the capital of France?", monkeypatch)   # no newline, then EOF
    assert len(seen) == 1
    loaded = load_model(chat_model_dir, device="cpu")
    fmt = get_format("chatml")
    ids = render_prompt(seen[0], loaded.tokenizer, fmt)
    expected = generate(loaded.model, loaded.tokenizer, [ids],
                        chat_sampling_config(fmt, loaded.tokenizer, max_new_tokens=6, temperature=0))
    assert out == expected.texts[0] + "\n"
    assert "<|im_end|>" not in out


def test_context_guard_drops_oldest_turns_keeps_system(chat_model_dir, monkeypatch):
    long = "Python is a snake and also a programming language. " * 2
    cfg = ChatConfig(model=str(chat_model_dir), system="Sys.", max_new_tokens=8, temperature=0, max_context=110)
    out, err, seen = run_chat_cli(cfg, f"{long}\n{long} again\n{long} third\n", monkeypatch)
    assert "dropped the" in err and "system prompt is kept" in err
    last = seen[-1]
    assert last[0] == {"role": "system", "content": "Sys."}
    assert last[-1]["content"] == f"{long} third"
    assert {"role": "user", "content": long} not in last          # the oldest turn is gone
    assert out == "".join(r + "\n" for r in _expected_replies(chat_model_dir, seen, 8, 110))


def test_message_too_long_is_refused_not_sent(chat_model_dir, monkeypatch):
    cfg = ChatConfig(model=str(chat_model_dir), max_new_tokens=4, temperature=0, max_context=30)
    out, err, seen = run_chat_cli(cfg, "word " * 80 + "\nhi\n", monkeypatch)
    assert "message too long" in err
    assert seen[-1] == [{"role": "user", "content": "hi"}]         # the long message left no trace
    assert out == "".join(r + "\n" for r in _expected_replies(chat_model_dir, seen[-1:], 4, 30))


def test_fit_history_unit(chat_model_dir):
    from chatsmith.model import load_model

    loaded = load_model(chat_model_dir, device="cpu")
    history = [{"role": "user", "content": "a " * 20}, {"role": "assistant", "content": "b " * 20},
               {"role": "user", "content": "c"}]
    full = len(terminal.render_prompt(history, loaded.tokenizer, loaded.fmt))
    ids, dropped = fit_history(None, list(history), loaded.tokenizer, loaded.fmt, full + 5, 5)
    assert dropped == 0 and len(ids) == full
    kept = list(history)
    ids, dropped = fit_history(None, kept, loaded.tokenizer, loaded.fmt, full, 5)
    assert dropped == 1 and kept == [{"role": "user", "content": "c"}]


def test_cli_subprocess_without_tty(chat_model_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in sys.path if p]))
    proc = subprocess.run([sys.executable, "-m", "chatsmith.cli", "chat", str(chat_model_dir), "--max-new-tokens",
                           "3", "--temperature", "0", "--system", "Hi."],
                          input="Hello\nAgain\n", capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") >= 2
    assert "chatsmith chat:" in proc.stderr
    missing = subprocess.run([sys.executable, "-m", "chatsmith.cli", "chat", str(chat_model_dir) + "-nope"],
                             input="", capture_output=True, text=True, timeout=300, env=env)
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_thinking_goes_to_stderr_and_stays_out_of_the_history(tmp_path, monkeypatch):
    """With a template whose generation prompt opens a think block, the reply's text up to `</think>` is
    thinking: printed on stderr, not stdout, and not sent back with the next turn."""
    from chatsmith.chat.reasoning import split_reasoning

    template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")
    from servers import tiny_chat_model     # a model that copies from its context, so it says something
    model_dir = tiny_chat_model(tmp_path / "model")
    cfg = ChatConfig(model=str(model_dir), template=template, max_new_tokens=12, temperature=0)
    out, err, seen = run_chat_cli(cfg, "The cat sat on the mat\nAnd now?\n", monkeypatch)
    from chatsmith.chat import get_format, render_prompt
    from chatsmith.generate import chat_sampling_config, generate
    from chatsmith.model import load_model
    loaded = load_model(model_dir, device="cpu")
    fmt = get_format(template)
    ids = render_prompt(seen[0], loaded.tokenizer, fmt)
    text = generate(loaded.model, loaded.tokenizer, [ids],
                    chat_sampling_config(fmt, loaded.tokenizer, temperature=0, max_new_tokens=12)).texts[0]
    reasoning, reply = split_reasoning(text, started=True)
    assert reasoning and reasoning in err and reasoning not in out
    assert out.splitlines()[0] == reply.strip()
    assert seen[1][1] == {"role": "assistant", "content": reply.strip()}
