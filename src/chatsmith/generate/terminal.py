"""`chatsmith chat MODEL`: an interactive multi-turn chat in the terminal, with memory.

    chatsmith chat runs/sft --system "You are a concise assistant." --temperature 0.7

Each turn renders the whole conversation (system prompt + every earlier turn + the new message) with the
model's chat format (`chatsmith.chat.render.render_prompt`) and streams the reply, which stops at the
format's end-of-turn token or text. The reply joins the history, so the model sees what was said before
(conversational memory). Commands: `/reset` forgets the conversation (keeps `--system`), `/exit` or
Ctrl-D quits, Ctrl-C stops a reply early. When the rendered history plus `--max-new-tokens` would not fit
the model's context, the oldest turns are dropped (never the system prompt) and a notice says so.

A reasoning model's thinking (`<think>…</think>`, chat/reasoning.py) goes to stderr, dimmed on a terminal,
and stays out of the history, as API clients keep it out of the conversation they send back.

It reads plain lines from stdin, so it also works in a pipe: `printf 'Hi\n' | chatsmith chat runs/sft`
prints just the replies (the `you>` / `assistant>` prompts appear only on a terminal).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

from chatsmith.chat.reasoning import ReasoningSplitter, opens_reasoning
from chatsmith.chat.render import render_prompt
from chatsmith.config import SEED_MAX, arg, validate_config
from chatsmith.errors import ChatsmithError

HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply."


@dataclass
class ChatConfig:
    model: str = arg("", "Model directory (a chat model, e.g. runs/sft).")
    system: str | None = arg(None, "System prompt, kept at the start of the conversation.")
    template: str | None = arg(None, "Chat format: chatml, llama2, alpaca or FILE.jinja (default: the model's own).")
    max_new_tokens: int = arg(256, "Most tokens per reply.", min=1)
    temperature: float = arg(0.7, "Sampling temperature; 0 = greedy.", min=0)
    top_k: int = arg(0, "Sample among the k most likely tokens only (0 = off).", min=0)
    top_p: float = arg(0.9, "Nucleus sampling probability mass (1 = off).", min=0, min_exclusive=True, max=1)
    repetition_penalty: float = arg(1.0, "Penalise tokens already present (1 = off).", min=0, min_exclusive=True)
    seed: int | None = arg(None, "Random seed (same seed and inputs, same replies).", min=0, max=SEED_MAX)
    max_context: int = arg(0, "Context budget in tokens for history + reply (0 = the model's maximum).", min=0)
    device: str = arg("auto", "cpu, cuda, mps or auto.")


def fit_history(system: str | None, history: list[dict], tokenizer: Any, fmt: Any, budget: int,
                reply_tokens: int) -> tuple[list[int] | None, int]:
    """Drop the oldest turns of ``history`` (in place) until prompt + ``reply_tokens`` fit ``budget``.

    Returns (prompt ids or None if even the last message alone does not fit, turns dropped). A turn is
    a user message and the assistant reply after it; the system prompt is always kept.
    """
    head = [{"role": "system", "content": system}] if system else []
    dropped = 0
    while True:
        ids = render_prompt(head + history, tokenizer, fmt)
        if len(ids) + reply_tokens <= budget:
            return ids, dropped
        if len(history) <= 1:
            # only the new message is left: accept it if it leaves room for at least a short reply
            return (ids if len(ids) < budget else None), dropped
        history.pop(0)
        while history and history[0]["role"] != "user":   # drop the reply of the dropped message too
            history.pop(0)
        dropped += 1


def chat_cli(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None,
             stderr: TextIO | None = None) -> int:
    """Run the chat loop until /exit or end of input."""
    validate_config(cfg)              # every setting, before any work (Python callers too)
    from chatsmith.generate.engine import Generator, chat_sampling_config
    from chatsmith.model import load_model, max_context_length

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if not cfg.model:
        raise ChatsmithError("chat: give a model directory (chatsmith chat MODEL)")
    if cfg.max_new_tokens < 1:
        raise ChatsmithError(f"--max-new-tokens: expected at least 1, got {cfg.max_new_tokens}")
    loaded = load_model(cfg.model, device=cfg.device, template=cfg.template)
    model, tokenizer, fmt = loaded.model, loaded.tokenizer, loaded.fmt
    model_limit = max_context_length(model, tokenizer)
    budget = min(cfg.max_context, model_limit) if cfg.max_context > 0 else model_limit
    if cfg.max_new_tokens >= budget:
        print(f"chatsmith chat: --max-new-tokens {cfg.max_new_tokens}: capped per reply to what is left of the "
              f"{budget}-token context after the conversation so far", file=stderr)
    sampling = chat_sampling_config(fmt, tokenizer, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                    repetition_penalty=cfg.repetition_penalty, seed=cfg.seed, logprobs=False)
    sampling.validate()
    generator = Generator(model, tokenizer)
    interactive = _is_tty(stdin) and _is_tty(stdout)
    print(f"chatsmith chat: {cfg.model} (format {fmt.name}, context {budget} tokens). {HELP}", file=stderr)

    history: list[dict] = []
    turn = 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if line == "":                      # end of input (Ctrl-D)
            if interactive:
                stdout.write("\n")
            break
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history.clear()
            print("[history cleared]", file=stderr)
            continue
        if command == "/help":
            print(HELP, file=stderr)
            continue

        history.append({"role": "user", "content": text})
        ids, dropped = fit_history(cfg.system, history, tokenizer, fmt, budget, cfg.max_new_tokens)
        if dropped:
            print(f"[context: dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit "
                  f"{budget} tokens; the system prompt is kept]", file=stderr)
        if ids is None:
            history.pop()
            print(f"[message too long: it does not fit the {budget}-token context; not sent]", file=stderr)
            continue
        sampling.max_new_tokens = min(cfg.max_new_tokens, budget - len(ids))
        if cfg.seed is not None:
            sampling.seed = cfg.seed + turn   # reproducible, but not the same draw every turn
        turn += 1
        if interactive:
            stdout.write("assistant> ")
        pieces: list[str] = []
        splitter = ReasoningSplitter(opens_reasoning(tokenizer.decode(ids[-16:])))

        def show(parts: list[tuple[str, str]]) -> None:
            for kind, text in parts:
                if kind == "reasoning":     # thinking: on stderr, dimmed on a terminal; not part of the reply
                    stderr.write(f"\x1b[2m{text}\x1b[0m" if _is_tty(stderr) else text)
                    stderr.flush()
                else:
                    pieces.append(text)
                    stdout.write(text)
                    stdout.flush()
        try:
            for piece in generator.stream(ids, sampling):
                show(splitter.feed(piece))
        except KeyboardInterrupt:
            print("\n[reply stopped]", file=stderr)
        show(splitter.finish())
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})   # as clients do: no thinking
    return 0


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
