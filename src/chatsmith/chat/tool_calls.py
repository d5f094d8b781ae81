"""Rendering conversations with tool calls: the template's `tools` variable and which text a tool-calling turn
generates.

    fmt = tool_format(fmt, tools, messages)        # fmt rendering with `tools=`; refuses templates without tools
    start, end = tool_call_span(fmt, skeleton_messages, index, skeleton)   # characters the model generates

Shipped templates write an assistant's `tool_calls` in their own syntax (Qwen2.5: `<tool_call>\\n{json}\\n
</tool_call>` after the content; Llama 3.1: the call's JSON *instead of* the content), so the call is not a
content slot that `chatsmith.chat.render` can mark. Instead the turn is located by rendering: its prompt
(the messages before it, generation prompt appended) is a prefix of the conversation rendered up to and
including it; what lies between is what the model generates (the call, any text, the end of turn), and is
trained on. Tool results (`tool` messages) are not: they are masked like user turns. Conversation rows with
tools are described in `chatsmith.data.tools`.

Tests: `python -m pytest tests/test_tool_calls.py -q`.
"""

from __future__ import annotations

import json
from typing import Any

from chatsmith.chat.templates import ChatFormat
from chatsmith.errors import TemplateError

__all__ = ["tool_format", "tool_call_span", "tool_call_spans", "uses_tools"]

_MAX_TOOL_FORMATS = 256   # formats kept per base format, one per distinct `tools` list


def uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") for m in messages)


def tool_format(fmt: ChatFormat, tools: list[dict] | None, messages: list[dict]) -> ChatFormat:
    """``fmt`` rendering with ``tools`` (the template variable ``apply_chat_template(tools=...)`` sets); the same
    ChatFormat object for the same list, so its render caches are reused. Refuses, naming the template, one that
    never reads ``tools`` while the row has some, or never reads ``tool_calls`` while a message makes one: the
    call would silently vanish from the training text."""
    if any(m.get("tool_calls") for m in messages) and "tool_calls" not in fmt.template:
        raise TemplateError(f"chat template {fmt.name!r} does not render tool calls (it never reads a message's "
                            "'tool_calls'); use the model's own template (one written for tools, like Qwen2.5's or "
                            "Llama 3.1's) or a .jinja file that renders them")
    if not tools:
        return fmt
    if "tools" not in fmt.template.replace("tool_calls", ""):
        raise TemplateError(f"chat template {fmt.name!r} does not render the row's 'tools' list (it never reads "
                            "the `tools` variable); use a template written for tools or drop the list")
    key = json.dumps(tools, sort_keys=True, ensure_ascii=False)
    cache = fmt.tool_variants
    found = cache.get(key)
    if found is None:
        if len(cache) >= _MAX_TOOL_FORMATS:
            cache.clear()
        found = cache[key] = ChatFormat(fmt.name, fmt.template, fmt.bos_token, fmt.eos_token,
                                        {**fmt.template_vars, "tools": tools})
    return found


def tool_call_span(fmt: ChatFormat, skeleton_messages: list[dict[str, Any]], index: int,
                   skeleton: str) -> tuple[int, int]:
    """``(start, end)``: the characters of ``skeleton`` (the whole conversation rendered) that the model
    generates for assistant message ``index``, which calls a tool: after its generation prompt, through its
    end of turn (trailing whitespace excluded, as for any turn)."""
    try:
        prompt = fmt.render_text(skeleton_messages[:index], True)
        turn = fmt.render_text(skeleton_messages[:index + 1], False).rstrip()
    except TemplateError:
        prompt = turn = ""
    if not (len(prompt) < len(turn) and turn.startswith(prompt) and skeleton.startswith(turn)):
        raise TemplateError(f"chat template {fmt.name!r}: cannot locate the tool call of assistant message {index} "
                            "(the conversation up to it, or its generation prompt, does not render as a prefix of "
                            "the whole), so the assistant mask cannot be made exact")
    return len(prompt), len(turn)


def tool_call_spans(fmt: ChatFormat, skeleton_messages: list[dict[str, Any]], skeleton: str, pieces: list,
                    offsets: list[int]) -> dict[int, list[tuple[int, int]]]:
    """Every tool-calling assistant turn's `tool_call_span`, as masked character ranges of the skeleton's
    literal ``pieces`` (strings; content slots are ints) that start at ``offsets``: piece index -> ranges."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for index, message in enumerate(skeleton_messages):
        if message.get("role") != "assistant" or not message.get("tool_calls"):
            continue
        start, end = tool_call_span(fmt, skeleton_messages, index, skeleton)
        for position, piece in enumerate(pieces):
            if not isinstance(piece, str):
                continue
            lo, hi = max(start, offsets[position]), min(end, offsets[position] + len(piece))
            if lo < hi:
                spans.setdefault(position, []).append((lo - offsets[position], hi - offsets[position]))
    return spans
