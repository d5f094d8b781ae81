"""Reasoning before a reply: `<think>…</think>` in training data, generated text and served responses.

Reasoning models (Qwen3, DeepSeek-R1 and its distillations, SmolLM3) write their thinking between
`<think>` and `</think>`, then the reply. The OpenAI-style message field for it is `reasoning_content`
(what vLLM, SGLang and transformers' Qwen3 template use); clients show it apart from `content` and do not
send it back with the conversation.

    fold_reasoning(messages, fmt.template)   # training rows: reasoning_content -> "<think>\\n…\\n</think>\\n\\n" + content
    split_reasoning(text)             # generated text -> (reasoning or None, content)
    s = ReasoningSplitter(); s.feed(piece) -> [("reasoning" | "content", text), ...]   # streaming

A template that reads `reasoning_content` itself (Qwen3's) gets the message as it is, so it writes the
reasoning where it wants it (on the latest turn only); any other template gets it folded into the content,
so a chat template that knows nothing of reasoning still trains on it, inside the assistant mask.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_FIELD = "reasoning_content"


def fold_reasoning(messages: list[dict], template_source: str) -> list[dict]:
    """`messages` with each assistant `reasoning_content` written into its content as
    `"<think>\\n{reasoning}\\n</think>\\n\\n{content}"`, unless the template reads the field itself (its
    source names `reasoning_content`), in which case the messages are returned unchanged."""
    if REASONING_FIELD in template_source or not any(REASONING_FIELD in m for m in messages):
        return messages
    out = []
    for message in messages:
        reasoning = message.get(REASONING_FIELD)
        if reasoning is None:
            out.append(message)
            continue
        folded = {k: v for k, v in message.items() if k != REASONING_FIELD}
        if reasoning.strip():
            folded["content"] = f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{message.get('content') or ''}"
        out.append(folded)
    return out


def opens_reasoning(prompt_text: str) -> bool:
    """True when a generation prompt already opens the thinking block (DeepSeek-R1's ends with `<think>\\n`):
    the model's text then starts inside it."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


def split_reasoning(text: str, started: bool = False) -> tuple[str | None, str]:
    """`(reasoning, content)` of a generated reply. `started`: the prompt opened the block (`opens_reasoning`).

    A reply that starts with `<think>` (after whitespace), or any reply when `started`, has its reasoning up to
    `</think>`; the content is what follows, leading whitespace removed. A block never closed (the budget ran
    out while thinking) is all reasoning, with an empty content. Any other text is all content: `(None, text)`.
    """
    body = text.lstrip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN):]
    elif not started:
        return None, text
    reasoning, closed, content = body.partition(THINK_CLOSE)
    return reasoning.strip(), content.lstrip() if closed else ""


class ReasoningSplitter:
    """Incremental `split_reasoning` for streamed text: `feed(piece)` returns the `("reasoning" | "content",
    text)` parts that are certain so far, `finish()` the rest; joined per kind they equal `split_reasoning`'s
    result. A tag split over two pieces (and whitespace that may pad one) is held back until it is decided."""

    def __init__(self, started: bool = False):
        self.started = started
        self.state = "start"       # start -> reasoning -> content, or start -> content
        self.held = ""
        self.fresh = True          # nothing emitted in the current state yet (its leading whitespace is dropped)

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.held += piece
        out: list[tuple[str, str]] = []
        if self.state == "start":
            body = self.held.lstrip()
            if body.startswith(THINK_OPEN):
                self.held, self.state = body[len(THINK_OPEN):], "reasoning"
            elif not body or THINK_OPEN.startswith(body):
                return out                       # whitespace or the first characters of <think> so far
            elif self.started:
                self.state = "reasoning"
            else:
                self.state, self.fresh = "content", False   # plain text: kept exactly as generated
        if self.state == "reasoning":
            if self.fresh:
                self.held = self.held.lstrip()
            reasoning, closed, rest = self.held.partition(THINK_CLOSE)
            if closed:
                out += [("reasoning", reasoning.rstrip())] if reasoning.strip() else []
                self.held, self.state, self.fresh = rest, "content", True
            else:
                ready = self.held[:len(self.held) - _partial_suffix(self.held, THINK_CLOSE)].rstrip()
                if ready:
                    out.append(("reasoning", ready))
                    self.held, self.fresh = self.held[len(ready):], False
                return out
        if self.state == "content":
            if self.fresh:
                self.held = self.held.lstrip()
            if self.held:
                out.append(("content", self.held))
                self.held, self.fresh = "", False
        return out

    def finish(self) -> list[tuple[str, str]]:
        """What is still held back at the end of the stream."""
        held, self.held = self.held, ""
        if self.state == "start":
            if self.started:
                return [("reasoning", held.strip())] if held.strip() and held.strip() != THINK_OPEN else []
            return [("content", held)] if held else []
        if self.state == "reasoning":
            return [("reasoning", held.rstrip() if self.fresh else held)] if held.strip() else []
        return [("content", held)] if held and not self.fresh else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag` (a tag still arriving)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
