"""Tool calls in conversation rows: the row-level `tools` list, assistant `tool_calls` and `tool` messages.

    {"tools": [{"type": "function", "function": {"name": "get_weather", "description": "...",
                                                  "parameters": {"type": "object", "properties": {...}}}}],
     "messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "call_1",
                      "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C, sunny"},
                  {"role": "assistant", "content": "It is 18 C and sunny in Paris."}]}

This is the OpenAI chat format, which Hugging Face chat templates read (`apply_chat_template(messages,
tools=tools)`). `arguments` may be an object or a JSON string holding one (OpenAI's wire form); it is kept
as an object, the form the shipped templates (Qwen, Llama 3.1) render with `tojson`. The validators below
raise `RowError` naming the field (`messages[1].tool_calls[0].function.name`); `chatsmith.data.records`
adds the file and line. Masks: tool results are not trained on (like user turns); an assistant turn that
calls a tool is, call included (`chatsmith.chat.render`). No I/O here.

Tests: `python -m pytest tests/test_tool_calls.py -q`.
"""

from __future__ import annotations

import json
from typing import Any

from chatsmith.data.records import MISSING, WRONG_TYPE, RowError, type_name

__all__ = ["TOOL_ROLE", "UNKNOWN_TOOL", "parse_tools", "parse_tool_calls", "check_tool_names", "has_tool_calls",
           "message_tool_fields", "row_tools"]

TOOL_ROLE = "tool"
UNKNOWN_TOOL = "unknown tool"   # a bad-row category: a call names no function of the row's `tools`


def has_tool_calls(message: dict) -> bool:
    return bool(message.get("tool_calls"))


def _object(value: Any, where: str, what: str) -> dict:
    if not isinstance(value, dict):
        raise RowError(WRONG_TYPE, f"{where} should be {what}, got {type_name(value)}")
    return value


def _name(function: dict, where: str) -> str:
    name = function.get("name")
    if name is None:
        raise RowError(MISSING, f"{where}.name is missing")
    if not isinstance(name, str) or not name.strip():
        raise RowError(WRONG_TYPE, f"{where}.name should be a non-empty string, got {name!r}")
    return name


def parse_tools(value: Any, where: str = "tools") -> list[dict] | None:
    """The row-level ``tools``: a list of ``{"type": "function", "function": {"name", "parameters", ...}}``
    (None when absent). Returned as given (descriptions and schemas are the template's to render)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise RowError(WRONG_TYPE, f"field {where!r} should be a list of tools, got {type_name(value)}")
    names: set[str] = set()
    for i, tool in enumerate(value):
        at = f"{where}[{i}]"
        _object(tool, at, 'an object {"type": "function", "function": {...}}')
        if tool.get("type") != "function":
            raise RowError(WRONG_TYPE, f"{at}.type should be \"function\", got {tool.get('type')!r}")
        function = _object(tool.get("function"), f"{at}.function", 'an object with "name" and "parameters"')
        name = _name(function, f"{at}.function")
        if "parameters" not in function:
            raise RowError(MISSING, f"{at}.function.parameters is missing (a JSON schema object)")
        _object(function["parameters"], f"{at}.function.parameters", "a JSON schema object")
        if name in names:
            raise RowError(WRONG_TYPE, f"{at}.function.name {name!r} is defined twice")
        names.add(name)
    return value


def _arguments(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise RowError(WRONG_TYPE, f"{where} is a string but not valid JSON ({exc.msg})") from None
    return _object(value, where, "an object (or a JSON string holding one)")


def parse_tool_calls(value: Any, where: str) -> list[dict]:
    """An assistant message's ``tool_calls``: ``[{"type": "function", "id"?, "function": {"name", "arguments"}}]``,
    normalised to ``arguments`` as an object and ``type`` "function"."""
    if not isinstance(value, list) or not value:
        raise RowError(WRONG_TYPE, f"{where} should be a non-empty list of tool calls, got {type_name(value)}")
    calls = []
    for i, call in enumerate(value):
        at = f"{where}[{i}]"
        _object(call, at, 'an object {"type": "function", "function": {"name", "arguments"}}')
        if call.get("type", "function") != "function":
            raise RowError(WRONG_TYPE, f"{at}.type should be \"function\", got {call.get('type')!r}")
        function = _object(call.get("function"), f"{at}.function", 'an object with "name" and "arguments"')
        out = {"type": "function", "function": {"name": _name(function, f"{at}.function"),
                                                "arguments": _arguments(function.get("arguments"),
                                                                        f"{at}.function.arguments")}}
        if call.get("id") is not None:
            if not isinstance(call["id"], str):
                raise RowError(WRONG_TYPE, f"{at}.id should be a string, got {type_name(call['id'])}")
            out["id"] = call["id"]
        calls.append(out)
    return calls


def check_tool_names(messages: list[dict], tools: list[dict] | None, where: str = "messages") -> None:
    """Every assistant tool call names a function of the row's ``tools`` (which must be given)."""
    known = {t["function"]["name"] for t in tools or []}
    for i, message in enumerate(messages):
        for j, call in enumerate(message.get("tool_calls") or []):
            name = call["function"]["name"]
            if tools is None:
                raise RowError(MISSING, f"{where}[{i}].tool_calls[{j}] calls {name!r} but the row has no 'tools' "
                                        "list declaring the functions")
            if name not in known:
                raise RowError(UNKNOWN_TOOL, f"{where}[{i}].tool_calls[{j}].function.name {name!r} is not a "
                                             f"function in 'tools' ({', '.join(sorted(known))})")


def message_tool_fields(msg: dict, role: str, calls: Any, where: str) -> dict:
    """The tool-call keys a validated message keeps: an assistant's ``tool_calls`` (``calls``, normalised), a
    tool result's ``tool_call_id`` and ``name``."""
    fields: dict[str, Any] = {}
    if calls is not None:
        fields["tool_calls"] = parse_tool_calls(calls, f"{where}.tool_calls")
    if role == TOOL_ROLE:
        for key in ("tool_call_id", "name"):
            if msg.get(key) is not None:
                if not isinstance(msg[key], str):
                    raise RowError(WRONG_TYPE, f"{where}.{key} should be a string, got {type_name(msg[key])}")
                fields[key] = msg[key]
    return fields


def row_tools(record: dict, fmt: str, messages: list[dict]) -> list[dict] | None:
    """The row's ``tools`` (messages and prompt_completion rows), checked against its messages' tool calls."""
    tools = parse_tools(record.get("tools")) if fmt in ("messages", "prompt_completion") else None
    check_tool_names(messages, tools, "messages" if fmt == "messages" else "conversation")
    return tools
