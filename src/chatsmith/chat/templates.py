"""Chat formats: the built-in Jinja chat templates and `ChatFormat`, which renders and knows its stop text.

A built-in format *is* a Hugging Face style Jinja `chat_template` (variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`), so a model saved with it carries it in its tokenizer
and plain `transformers` `apply_chat_template` renders exactly what chatsmith renders. Jinja is rendered
the way transformers does it (sandboxed, `trim_blocks`/`lstrip_blocks`, loop controls, a `tojson` filter
that does not escape HTML, `raise_exception`, `strftime_now`, and a `{% generation %}` tag that is accepted
and ignored: chatsmith computes assistant masks itself, see `chat/render.py`).

Message convention: `{"role": "system"|"user"|"assistant", "content": str}`. The `alpaca` format also
reads an optional `"input"` key on a user message (the Alpaca "### Input:" context); chatsmith treats it
as user text (plain text, mask 0) like `content`.

    from chatsmith.chat import get_format
    fmt = get_format("chatml")
    fmt.render_text([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

Run the tests: `python -m pytest tests/test_chat_templates.py -q`.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from chatsmith.errors import TemplateError

# ----------------------------------------------------------------------------- built-in templates
# The templates write their control tokens literally (not via `bos_token`/`eos_token`), so they render
# the same text whatever special tokens a tokenizer declares. They insert every content verbatim (no
# trim), which lets `render.py` build the text without running Jinja (a fast path tested for equality).

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ChatML with a space before every user and system message (replies start right after the header, so the
# generation prompt is ChatML's). A byte-level BPE then reads a message's first word the way it reads it
# mid-sentence, as one token (" Java" -> `ĠJava`; "Java" at the start of a text is `J`, `ava`): a small model
# recognises the word it learnt in running text. SentencePiece's dummy prefix does the same (Kudo and
# Richardson 2018). `render.py` tokenizes the space with the message, as the whole text tokenizes.
_CHATML_SPACE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set lead = '' %}{% else %}{% set lead = ' ' %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + lead + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama-2 chat (Touvron et al. 2023, and Meta's reference `chat_completion`): each user turn is
# `<s>[INST] … [/INST]`, each reply ` … </s>`; an optional system prompt sits in the first user turn.
_LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system_message = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('llama2: after an optional system message, roles must alternate user/assistant/user/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message is not none %}"
    "{{ '<s>[INST] <<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '<s>[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + ' </s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ' }}{% endif %}"
)

# Alpaca (Taori et al. 2023, tatsu-lab/stanford_alpaca): an optional preamble (the system message),
# `### Instruction:`, an optional `### Input:` (the user message's "input" key), `### Response:`. The reply
# is closed by `</s>` so the model learns to stop; turns are separated by a blank line.
_ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% if message.get('input') %}{{ '### Input:\\n' + message['input'] + '\\n\\n' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + '</s>' }}"
    "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% else %}{{ raise_exception('alpaca: unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": _CHATML, "chatml-space": _CHATML_SPACE, "llama2": _LLAMA2,
                                     "alpaca": _ALPACA}

BUILTIN_SPECIAL_TOKENS: dict[str, list[str]] = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "chatml-space": ["<|im_start|>", "<|im_end|>"],
    "llama2": ["<s>", "</s>"],
    "alpaca": ["</s>"],
}

_BUILTIN_STOP_STRINGS: dict[str, list[str]] = {"chatml": ["<|im_end|>"], "chatml-space": ["<|im_end|>"],
                                               "llama2": ["</s>"], "alpaca": ["</s>"]}
_BUILTIN_BOS_EOS: dict[str, tuple[str | None, str]] = {
    "chatml": (None, "<|im_end|>"), "chatml-space": (None, "<|im_end|>"), "llama2": ("<s>", "</s>"),
    "alpaca": (None, "</s>"),
}

_TEMPLATE_HINT = "pass --template chatml|chatml-space|llama2|alpaca|FILE.jinja"


# ----------------------------------------------------------------------------- Jinja environment

def _make_environment():
    """A sandboxed Jinja environment configured like transformers' chat-template renderer."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """Accept `{% generation %}…{% endgeneration %}` (HF assistant markers) and render the body as is."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return body

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


_ENV = None


@lru_cache(maxsize=64)
def compile_template(template: str, name: str = "template"):
    """Compile (once per template string) a Jinja chat template; syntax errors become `TemplateError`."""
    import jinja2

    global _ENV
    if _ENV is None:
        _ENV = _make_environment()
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{name}:{exc.lineno}: Jinja syntax error in chat template: {exc.message}") from None


# ----------------------------------------------------------------------------- ChatFormat

class ChatFormat:
    """A chat format: a Jinja template plus the variables it is rendered with.

    `name` is a built-in name, a file path or "jinja" (a tokenizer's own template); `template_vars` are
    the extra variables transformers would pass (the tokenizer's special tokens map).
    """

    def __init__(self, name: str, template: str, bos_token: str | None = None, eos_token: str | None = None,
                 template_vars: dict[str, Any] | None = None, stop_strings: list[str] | None = None):
        self.name = name
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.template_vars = dict(template_vars or {})
        self._stop_strings = list(stop_strings) if stop_strings is not None else None
        builtin = next((n for n, t in BUILTIN_TEMPLATES.items() if t == template), None)
        # Built-in templates insert contents verbatim: render.py may build their text without Jinja.
        self.verbatim_contents = builtin is not None
        self._compiled = compile_template(template, name)
        self._plans: Any = None  # per-tokenizer caches owned by chat/render.py
        self.tool_variants: dict[str, ChatFormat] = {}  # this format with a `tools` list, see chat/tool_calls.py

    def __repr__(self) -> str:
        return f"ChatFormat(name={self.name!r})"

    # -- rendering
    def render_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render `messages` to text exactly as `tokenizer.apply_chat_template(..., tokenize=False)` does."""
        import jinja2

        variables = dict(self.template_vars)
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        if self.eos_token is not None:
            variables["eos_token"] = self.eos_token
        # transformers drops keys whose value is None before rendering; do the same.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **variables)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template {self.name!r} failed to render: {exc}") from None
        except (TypeError, KeyError, AttributeError, IndexError) as exc:
            raise TemplateError(f"chat template {self.name!r} failed to render: {type(exc).__name__}: {exc}") from None

    # -- stopping
    @property
    def stop_strings(self) -> list[str]:
        """Text that ends an assistant turn (e.g. `["<|im_end|>"]`), derived from the template if not built in."""
        if self._stop_strings is None:
            self._stop_strings = _derive_stop_strings(self)
        return list(self._stop_strings)

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Ids of the stop strings that are single tokens of `tokenizer` (e.g. the id of `<|im_end|>`)."""
        ids: list[int] = []
        for text in self.stop_strings:
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(int(encoded[0]))
        return ids


def missing_special_tokens(fmt: ChatFormat, tokenizer) -> list[str]:
    """The built-in format's special tokens that `tokenizer` does not encode as one token (add them, and
    resize the model's embeddings, before training with this format)."""
    missing = []
    for token in BUILTIN_SPECIAL_TOKENS.get(fmt.name, []) if fmt.verbatim_contents else []:
        if len(tokenizer.encode(token, add_special_tokens=False)) != 1:
            missing.append(token)
    return missing


def _at_boundary(text: str, position: int) -> bool:
    """Whether `position` splits `text` between whole markers: at either end, next to whitespace, after a
    closing `>`/`]` or before an opening `<`/`[` (so `<|end|>\\n<|user|>` splits after `<|end|>`, never
    inside `<|user|>`)."""
    if position <= 0 or position >= len(text):
        return True
    before, after = text[position - 1], text[position]
    return before.isspace() or after.isspace() or before in ">]" or after in "<["


def common_closing(a: str, b: str) -> str:
    """The longest common prefix of `a` and `b` that ends between whole markers in both, right-stripped.

    `common_closing("<|end|>\\n<|endoftext|>", "<|end|>\\n<|user|>\\n") == "<|end|>"`.
    """
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    for p in range(n, 0, -1):
        if _at_boundary(a, p) and _at_boundary(b, p):
            return a[:p].rstrip()
    return ""


def turn_closings(fmt: ChatFormat, messages: list[dict], index: int, reply_marker: str,
                  user_marker: str) -> tuple[str | None, str]:
    """How the template closes assistant message `index` (whose content is the unique `reply_marker`):
    `(mid, final)`, the end-of-turn text in the middle of a chat and at the end of a conversation.

    Two renderings show it: the conversation ending with the reply (`end`: what follows it, right-stripped)
    and continued by a user message whose content is `user_marker` (`mid`: what follows the reply up to that
    content, the next header included). Their common closing is the end of turn (`<|im_end|>`; Phi-3's
    `<|end|>`, whose final turn is followed by an extra eos that is not part of the turn). A template that
    closes the final turn with a marker of its own (gpt-oss: `<|return|>`, earlier turns `<|end|>`) has no
    common closing: the final turn ends with `end`, an earlier one with the closing every other message
    gets (the user message's, when the conversation ends with it), if the mid-chat text starts with it.
    `mid` is None when neither applies (turns closed by the next header, `\\n\\nUser:`: see render.py).
    Private-use markers keep the template's own text apart from contents.
    """
    prefix = [dict(m) for m in messages[: index + 1]]
    try:
        ended = fmt.render_text(prefix, False)
    except TemplateError:
        ended = ""
    at = ended.rfind(reply_marker)
    end = ended[at + 1:].rstrip() if at >= 0 else ""
    try:
        continued = fmt.render_text(prefix + [{"role": "user", "content": user_marker}], False)
    except TemplateError:
        return (end or None), end
    at, user_at = continued.rfind(reply_marker), continued.rfind(user_marker)
    if not 0 <= at < user_at:
        return (end or None), end
    mid_text = continued[at + 1:user_at]
    shared = common_closing(end, mid_text)
    if shared:
        return shared, shared
    user_close = continued[user_at + 1:].rstrip()
    if user_close and mid_text.startswith(user_close) and _at_boundary(mid_text, len(user_close)):
        return user_close, end
    return None, end


def _derive_stop_strings(fmt: ChatFormat) -> list[str]:
    """The end-of-turn texts of an assistant reply (mid-chat first, then a different final closing), or
    else the next turn's header (stripped). Rendered with private-use markers as contents."""
    reply, user, later = "\U0010fff0", "\U0010fff1", "\U0010fff2"
    for prefix in ([], [{"role": "system", "content": "\U0010fff3"}]):
        conversation = prefix + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        try:
            fmt.render_text(conversation)
        except TemplateError:
            continue
        mid, final = turn_closings(fmt, conversation, len(conversation) - 1, reply, later)
        closings = list(dict.fromkeys(text for text in (mid, final) if text))
        if closings:
            return closings
        try:
            longer = fmt.render_text(conversation + [{"role": "user", "content": later}])
        except TemplateError:
            continue
        if reply in longer and later in longer:
            header = longer[longer.rfind(reply) + 1:longer.rfind(later)].strip()
            if header:
                return [header]
    return [fmt.eos_token] if fmt.eos_token else []


def _tokenizer_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates (e.g. "default", "tool_use")
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def _tokenizer_vars(tokenizer) -> dict[str, Any]:
    if tokenizer is None:
        return {}
    return {k: v for k, v in dict(getattr(tokenizer, "special_tokens_map", {}) or {}).items() if isinstance(v, str)}


def builtin_format(name: str) -> ChatFormat:
    bos, eos = _BUILTIN_BOS_EOS[name]
    return ChatFormat(name, BUILTIN_TEMPLATES[name], bos_token=bos, eos_token=eos,
                      stop_strings=_BUILTIN_STOP_STRINGS[name])


def _from_template_string(name: str, template: str, tokenizer) -> ChatFormat:
    builtin = next((n for n, t in BUILTIN_TEMPLATES.items() if t == template), None)
    if builtin is not None:
        return builtin_format(builtin)
    variables = _tokenizer_vars(tokenizer)
    return ChatFormat(name, template, bos_token=variables.pop("bos_token", None),
                      eos_token=variables.pop("eos_token", None), template_vars=variables)


_FORMAT_CACHE: dict[tuple, ChatFormat] = {}


def get_format(name_or_template: str | ChatFormat | None, tokenizer=None) -> ChatFormat:
    """Resolve a format: `"chatml"|"llama2"|"alpaca"`, `"jinja"`/`None` (the tokenizer's own
    `chat_template`), a path to a `.jinja` file, or an inline Jinja string. Formats are cached, so repeated
    calls reuse compiled templates and rendering plans.
    """
    if isinstance(name_or_template, ChatFormat):
        return name_or_template
    if name_or_template in BUILTIN_TEMPLATES:
        key: tuple = ("builtin", name_or_template)
        if key not in _FORMAT_CACHE:
            _FORMAT_CACHE[key] = builtin_format(name_or_template)
        return _FORMAT_CACHE[key]
    if name_or_template is None or name_or_template == "jinja":
        template = _tokenizer_template(tokenizer) if tokenizer is not None else None
        if template is None:
            what = "no tokenizer was given" if tokenizer is None else "the tokenizer has no chat_template"
            raise TemplateError(f"template 'jinja' needs the tokenizer's own chat template, but {what}; "
                                f"{_TEMPLATE_HINT}")
        name, source = "jinja", template
    elif isinstance(name_or_template, str) and ("{%" in name_or_template or "{{" in name_or_template):
        name, source = "inline", name_or_template
    elif isinstance(name_or_template, (str, os.PathLike)):
        path = Path(name_or_template)
        if not path.is_file():
            raise TemplateError(f"unknown chat template {str(name_or_template)!r}: not a built-in name and no such "
                                f"file; {_TEMPLATE_HINT}, or jinja for the tokenizer's own template")
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"{path}: cannot read chat template: {exc}") from None
        name = str(path)
    else:
        raise TemplateError(f"chat template must be a name or a path, got {type(name_or_template).__name__}; "
                            f"{_TEMPLATE_HINT}")
    variables = _tokenizer_vars(tokenizer)
    key = ("jinja", name, source, tuple(sorted(variables.items())))
    if key not in _FORMAT_CACHE:
        if len(_FORMAT_CACHE) > 256:
            _FORMAT_CACHE.clear()
        _FORMAT_CACHE[key] = _from_template_string(name, source, tokenizer)
    return _FORMAT_CACHE[key]
