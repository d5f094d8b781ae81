"""The OpenAI wire format of `chatsmith serve`: reading and checking request bodies, error JSON.

    data = await read_json_body(request, limit=1_000_000)     # APIError 400/413 on a bad body
    params = parse_sampling(data, context=512, cap=256)        # APIError 400 on a bad field
    messages = parse_messages(data)                            # [{"role", "content"}], roles checked

Every client mistake raises `APIError`, which the app turns into the OpenAI error shape
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status; the server keeps serving.

Tests: `python -m pytest tests/test_serve.py -q`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["APIError", "error_body", "read_json_body", "SamplingParams", "parse_sampling", "parse_messages",
           "parse_prompts", "ROLES", "MAX_CHOICES"]

ROLES = ("system", "user", "assistant")
MAX_CHOICES = 16          # most choices (n) one request may ask for
MAX_STOP_STRINGS = 4      # as the OpenAI API


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


async def read_json_body(request: Any, limit: int) -> dict[str, Any]:
    """The request's JSON object; 413 past ``limit`` bytes, 400 for non-UTF-8, malformed or non-object JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


@dataclass
class SamplingParams:
    """What a request asks of the generator (already checked)."""

    max_tokens: int | None              # None = as many as the cap and the context allow
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _number(data: dict, name: str, default: Any, low: float, high: float, integer: bool = False) -> Any:
    value = data.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise APIError(400, f"'{name}' must be {kind}, got {json.dumps(value)[:40]}", param=name,
                       code="invalid_type")
    if not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low:g} and {high:g}, got {value}", param=name,
                       code="invalid_value")
    return value


def parse_sampling(data: dict, context: int, cap: int) -> SamplingParams:
    """Check the sampling fields of a chat or completion request. ``context``: the model's context length,
    past which ``max_tokens`` is refused as absurd; ``cap``: the server's limit (larger values are cut)."""
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = data.get(name)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise APIError(400, f"'{name}' must be an integer, got {json.dumps(max_tokens)[:40]}", param=name,
                           code="invalid_type")
        if max_tokens <= 0:
            raise APIError(400, f"'{name}' must be at least 1, got {max_tokens}", param=name, code="invalid_value")
        if max_tokens > context:
            raise APIError(400, f"'{name}' is {max_tokens} but the model's context is {context} tokens", param=name,
                           code="invalid_value")
        max_tokens = min(max_tokens, cap)
    stop = data.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop",
                       code="invalid_value")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream", code="invalid_type")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise APIError(400, "'top_p' must be greater than 0", param="top_p", code="invalid_value")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(_number(data, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(top_p),
        top_k=_number(data, "top_k", 0, 0, 1 << 30, integer=True),
        seed=_number(data, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        n=_number(data, "n", 1, 1, MAX_CHOICES, integer=True),
        stop=stop, stream=stream, include_usage=bool(options.get("include_usage", False)))


def _content_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"{where}: only text content parts are supported", param=where,
                               code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where}: must be a string or a list of text parts", param=where, code="invalid_type")


def parse_messages(data: dict) -> list[dict[str, str]]:
    """The conversation of a chat request as ``[{"role", "content"}]`` (``developer`` counts as ``system``)."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise APIError(400, "'messages' must be a list of {role, content} objects", param="messages",
                       code="invalid_type")
    if not messages:
        raise APIError(400, "'messages' is empty: send at least one message", param="messages",
                       code="invalid_value")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where}: must be an object with 'role' and 'content'", param=where,
                           code="invalid_type")
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise APIError(400, f"{where}.role: unknown role {json.dumps(role)[:40]}; expected one of "
                           f"{', '.join(ROLES)}", param=f"{where}.role", code="invalid_value")
        if message.get("content") is None:
            raise APIError(400, f"{where}.content: missing", param=f"{where}.content", code="invalid_value")
        out.append({"role": role, "content": _content_text(message["content"], f"{where}.content")})
    return out


def parse_prompts(data: dict) -> list[str]:
    """The prompt(s) of a completion request: a string or a list of strings, none empty."""
    prompt = data.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt",
                       code="invalid_type")
    if any(not p for p in prompts):
        raise APIError(400, "'prompt' is empty", param="prompt", code="invalid_value")
    if len(prompts) > MAX_CHOICES:
        raise APIError(400, f"'prompt' takes at most {MAX_CHOICES} strings", param="prompt", code="invalid_value")
    return prompts
