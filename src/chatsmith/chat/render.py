"""Render a conversation to token ids with an exact assistant-only loss mask, for any Jinja chat template.

    from chatsmith.chat import get_format, render_chat, render_prompt
    fmt = get_format("chatml")
    r = render_chat(messages, tokenizer, fmt)     # r.input_ids, r.assistant_mask (same length), r.text
    prompt_ids = render_prompt(messages, tokenizer, fmt)   # for generation (gen prompt appended)

How the mask is made exact without `{% generation %}` markers
1. The conversation is rendered once more with every content replaced by a unique private-use character
   (a "sentinel"). That "skeleton" splits into the template's own text (literals) and content slots, in
   the order the template writes them: injected default system prompts, headers, separators, reordered or
   merged system prompts all end up in literals. Skeletons depend only on the conversation's structure
   (roles, which fields are empty, other keys), so they are cached with everything derived from them.
2. The real rendering is aligned to skeleton + contents, accepting each content verbatim or
   whitespace-stripped (`trim`, `lstrip`, `rstrip` in templates; or newlines only, `lstrip('\\n')` in
   Qwen3 and SmolLM3). Anything else (a template that drops, repeats or rewrites an assistant reply, or
   rewrites another message) raises `TemplateError` naming the template and the message index: a mask
   is never silently wrong.
3. Text generated before the reply: the prompt of assistant turn k (the messages before it, generation
   prompt appended) is compared with what the template writes before reply k, after the last content both
   share. If the template writes more than its generation prompt (Qwen3's empty `<think>\\n\\n</think>\\n\\n`
   on the latest turn, gpt-oss's `<|channel|>final<|message|>`), the model generates that text: it is in
   the mask. Not so when the generation prompt already holds it (Qwen3 with `enable_thinking=false`), or
   when the template has no generation prompt at all (its text before a reply is the reply's header).
4. End of turn (`templates.turn_closings`): the conversation is rendered ending with reply k, and continued
   by a user message. What both write right after the reply, cut between whole markers, is the end of turn
   (`<|im_end|>`, ` </s>`, `<|eot_id|>`; Phi-3's `<|end|>`, whose final turn is followed by an extra eos
   that is not part of the turn); trailing whitespace is not part of it (the model never has to generate
   it). A template that closes the final turn with a marker of its own (gpt-oss: `<|return|>` at the end,
   `<|end|>` before) masks that marker on the final turn and, on earlier ones, the closing the template
   gives every other message (`<|end|>`), so an earlier turn never covers the next user's header. A
   template that closes turns with the next role's header (`User: …\\n\\nAssistant: …\\n\\n`) has no
   such text; the mask then covers the template text up to the next message's content, whitespace-stripped
   on the right (`\\n\\nUser:`), so the model learns to stop.
5. Tokenization is done segment by segment: template text with special tokens recognised, message
   contents as plain text (`encode_special_tokens`, so a typed `<|im_end|>` or `</s>` stays text). The ids
   are therefore what the model sees at inference: the prompt tokenized, then reply tokens generated — no
   BPE merge crosses a message boundary, with one exception: a template's single space right before a
   message (`"[INST] " + content`, chatml-space's `"\\n " + content`) is tokenized with the message, as
   the whole text tokenizes (` What` is one byte-level token); before a reply only where the model
   generates that space (not llama2's, which ends the generation prompt). The result is checked with
   `decode(ids) == text`; a tokenizer that cannot round-trip segments (e.g. SentencePiece adding a prefix
   space to each piece) falls back to tokenizing the whole text with offsets: a token is in the mask if
   any of its characters is, and a control token inside a message content is refused with a `DataError`.

An assistant message may carry its reasoning in `reasoning_content` (chat/reasoning.py): a template that reads
that field writes it itself; for any other it is folded into the content as `<think>…</think>` before the
reply, so it is trained on with the reply.

Built-in templates insert contents verbatim, so for them the text is assembled from the cached skeleton
without running Jinja (tests check it equals the Jinja rendering).

Tokenizer access (template text, plain message text, offsets) is `chat/codec.py`; like it, rendering is
not thread-safe per tokenizer.

Run the tests: `python -m pytest tests/test_chat_templates.py -q`.
"""

from __future__ import annotations

import json
import re
import weakref
from collections import Counter
from dataclasses import dataclass

from chatsmith.chat.codec import Codec, codec_for
from chatsmith.chat.reasoning import REASONING_FIELD, fold_reasoning
from chatsmith.chat.templates import ChatFormat, get_format, turn_closings
from chatsmith.chat.tool_calls import tool_call_spans, tool_format, uses_tools
from chatsmith.errors import DataError, TemplateError

CONTENT_FIELDS = ("content", "input")  # message fields holding free text ("input": Alpaca context)
_SENTINEL_BASES = ((0x100000, 0xFFFE), (0xF0000, 0xFFFE), (0xE000, 0x1900))  # (first code point, count)
_MAX_PLANS_PER_TOKENIZER = 4096


@dataclass
class RenderedChat:
    """`input_ids` and `assistant_mask` are both `(t,)`; `text` is the rendered conversation."""

    input_ids: list[int]
    assistant_mask: list[int]
    text: str


# ----------------------------------------------------------------------------- conversation structure

def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"a conversation must be a non-empty list of messages, got {type(messages).__name__}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str):
            raise DataError(f"message {i}: 'role' must be a string (system/user/assistant), got {role!r}")
        for field in CONTENT_FIELDS:
            value = message.get(field)
            if value is not None and not isinstance(value, str):
                raise DataError(f"message {i} ({role}): {field!r} must be a string, got {type(value).__name__}")
        if "content" not in message or message["content"] is None:
            raise DataError(f"message {i} ({role}): missing 'content'")
        reasoning = message.get(REASONING_FIELD)
        if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
            raise DataError(f"message {i} ({role}): {REASONING_FIELD!r} must be a string on an assistant message, "
                            f"got {type(reasoning).__name__} on a {role} message")
        # transformers drops None-valued keys before rendering; so do we (same text, same structure key)
        checked.append(message if None not in message.values() else {k: v for k, v in message.items() if v is not None})
    return checked


def _slots_and_key(messages: list[dict]) -> tuple[list[tuple[int, str, str, bool]], tuple]:
    """Content slots `(message index, field, text, masked)` and a hashable key of the structure.

    Every assistant content gets a slot (so its end of turn can be located even when empty); other text
    fields only when non-empty, so `{% if message.input %}` sees the same truthiness in the skeleton.
    """
    slots = []
    key = []
    for i, message in enumerate(messages):
        role = message["role"]
        flags = []
        for field in CONTENT_FIELDS:
            value = message.get(field)
            flags.append(0 if value is None else (2 if value else 1))
            if value is None:
                continue
            # An assistant content is a reply slot, unless the turn only calls a tool (chat/tool_calls.py).
            is_reply = role == "assistant" and field == "content" and bool(value or not message.get("tool_calls"))
            if value or is_reply:
                slots.append((i, field, value, is_reply))
        if len(message) > 2:
            extras = tuple(sorted((k, repr(v)) for k, v in message.items() if k != "role" and k not in CONTENT_FIELDS))
        else:
            extras = ()
        key.append((role, tuple(flags), extras))
    return slots, tuple(key)


_PRIVATE_USE = re.compile("[\ue000-\uf8ff\U000f0000-\U0010fffd]")


def _sentinel_base(values: list[str], n_slots: int) -> int:
    """First code point of `n_slots` consecutive private-use characters that no content contains."""
    highest = max((max(v) for v in values if v), default="\x00")
    if highest < chr(_SENTINEL_BASES[-1][0]):
        return _SENTINEL_BASES[0][0]
    used = sorted({ord(c) for v in values for c in _PRIVATE_USE.findall(v)})
    for first, count in _SENTINEL_BASES:
        base = first
        for code in used:  # walk the used code points of this range, looking for a gap of n_slots
            if code < base:
                continue
            if code >= base + n_slots:
                break
            base = code + 1
        if base + n_slots <= first + count:
            return base
    raise TemplateError(f"cannot find {n_slots} private-use characters absent from the conversation to "
                        "use as content markers")


# ----------------------------------------------------------------------------- plans (cached per structure)

@dataclass
class _Literal:
    text: str
    ids: list[int]
    mask: list[int]
    # (start, end) character ranges of `text` the model generates (mask 1): end-of-turn text at its start,
    # text generated before the next reply at its end, a tool call anywhere
    spans: tuple[tuple[int, int], ...] = ()


@dataclass
class _Plan:
    pieces: list  # `_Literal` or slot index (int), in the order the template writes them
    masked_slots: frozenset
    joined: tuple = ()  # per content piece, in order: tokenized with the space before it (`_joins_space`)


def _role_of(messages, slots, slot):
    i = slots[slot][0]
    return i, messages[i]["role"]


def _build_plan(fmt: ChatFormat, codec: Codec, messages: list[dict], slots, base: int, n_markers: int,
                add_generation_prompt: bool) -> _Plan:
    sentinels = [chr(base + j) for j in range(len(slots))]
    skeleton_messages = [dict(m) for m in messages]
    for j, (i, field, _, _) in enumerate(slots):
        skeleton_messages[i][field] = sentinels[j]
    skeleton = fmt.render_text(skeleton_messages, add_generation_prompt)

    parts = re.split(f"([{chr(base)}-{chr(base + len(slots) - 1)}])", skeleton) if slots else [skeleton]
    raw_pieces: list = []
    offsets: list[int] = []  # where each piece starts in the skeleton
    at = 0
    for k, part in enumerate(parts):
        if k % 2:
            raw_pieces.append(ord(part) - base)
        elif part:
            raw_pieces.append(part)
        else:
            continue
        offsets.append(at)
        at += len(part)

    counts = Counter(p for p in raw_pieces if isinstance(p, int))
    masked = frozenset(j for j, slot in enumerate(slots) if slot[3])
    for j in sorted(masked):
        i = slots[j][0]
        if counts[j] == 0 and not messages[i].get("tool_calls"):   # Llama 3.1 writes only the call
            raise TemplateError(f"chat template {fmt.name!r} drops assistant message {i} (it does not appear in the "
                                "rendered text), so the assistant mask cannot be made exact")
        if counts[j] > 1:
            raise TemplateError(f"chat template {fmt.name!r} writes assistant message {i} {counts[j]} times, so "
                                "which copy the model should learn is ambiguous")

    markers = f"[{chr(base)}-{chr(base + n_markers - 1)}]"
    user_marker = chr(base + n_markers)  # one code point past every content marker
    # literal piece index -> its masked character ranges; first the tool calls' (chat/tool_calls.py)
    spans = tool_call_spans(fmt, skeleton_messages, skeleton, raw_pieces, offsets)
    for position, piece in enumerate(raw_pieces):
        if not (isinstance(piece, int) and piece in masked) or messages[slots[piece][0]].get("tool_calls"):
            continue
        index = slots[piece][0]
        # Text the model generates between the generation prompt and the reply (module docstring, step 3).
        if position and isinstance(raw_pieces[position - 1], str):
            generated = _generated_before_reply(fmt, skeleton_messages, index, skeleton[:offsets[position]],
                                                markers)
            if generated and raw_pieces[position - 1].endswith(generated):
                text = raw_pieces[position - 1]
                spans.setdefault(position - 1, []).append((len(text) - len(generated), len(text)))
        # End-of-turn text after the reply (module docstring, step 4).
        follower = raw_pieces[position + 1] if position + 1 < len(raw_pieces) else None
        after = follower if isinstance(follower, str) else ""
        mid, final = turn_closings(fmt, skeleton_messages, index, sentinels[piece], user_marker)
        if index == len(messages) - 1 and final and after.startswith(final):
            spans.setdefault(position + 1, []).append((0, len(final)))
        elif mid and after.startswith(mid):
            spans.setdefault(position + 1, []).append((0, len(mid)))
        elif after.rstrip():
            # Closed by the next header: up to the next message's text. Empty contents have no slot in the
            # skeleton, so find that boundary in a rendering where every text field is marked.
            header = _next_header_text(fmt, messages, slots, base, add_generation_prompt, piece)
            if header is None or not after.startswith(header):
                later_text = any(isinstance(p, int) for p in raw_pieces[position + 1:])
                header = after.rstrip() if later_text else ""  # never the generation prompt
            if header:
                spans.setdefault(position + 1, []).append((0, len(header)))
    joins = {position - 1 for position, piece in enumerate(raw_pieces)
             if _joins_space(raw_pieces, spans, masked, position)}
    joined = tuple(position - 1 in joins for position, piece in enumerate(raw_pieces) if isinstance(piece, int))
    return _Plan(_tokenize_literals(codec, raw_pieces, spans, joins), masked, joined)


def _joins_space(raw_pieces: list, spans: dict[int, list[tuple[int, int]]], masked: frozenset, position: int) -> bool:
    """Whether the literal before content slot `position` ends with a space that is tokenized with the content.

    A template that writes `"[INST] " + content` or `"\\n " + content` means the content's first word to be
    read as it is mid-sentence (`" What"`: one byte-level token `ĠWhat`, not `"Ġ", "What"`), which is also
    how the whole rendered text tokenizes. The space joins the content when that keeps prompts a prefix of
    training rows: always before a user/system content (a prompt holds it whole), and before a reply only
    when the space is text the model generates (the template writes it after the generation prompt).
    """
    if position == 0 or not isinstance(raw_pieces[position], int):
        return False
    before = raw_pieces[position - 1]
    if not isinstance(before, str) or not before.endswith(" ") or before.endswith("  "):
        return False
    if raw_pieces[position] not in masked:
        return True
    return any(start < len(before) <= end for start, end in spans.get(position - 1, []))


def _segments(length: int, spans: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(start, end, bit)``: ``[0, length)`` cut at the edges of the (merged) masked ``spans``."""
    out: list[tuple[int, int, int]] = []
    at = 0
    for start, end in sorted(spans):
        start = max(start, at)
        if start > at:
            out.append((at, start, 0))
        if end > start:
            out.append((start, end, 1))
        at = max(at, end)
    if at < length:
        out.append((at, length, 0))
    return out


def _tokenize_literals(codec: Codec, raw_pieces: list, spans: dict[int, list[tuple[int, int]]],
                       joins: set[int]) -> list:
    """Pieces with every literal tokenized (once per structure) segment by segment: its masked character
    ranges (`spans`: end of turn, text generated before a reply, a tool call) apart from the rest. A literal
    in `joins` is tokenized without its final space (the next content is, with it)."""
    cuts = {}
    for p, piece in enumerate(raw_pieces):
        if isinstance(piece, str):
            length = len(piece) - (p in joins)
            cuts[p] = _segments(length, [(a, min(b, length)) for a, b in spans.get(p, []) if a < length])
    segment_ids = iter(codec.encode_template([raw_pieces[p][a:b] for p, segs in cuts.items() for a, b, _ in segs]))
    pieces: list = []
    for position, piece in enumerate(raw_pieces):
        if isinstance(piece, int):
            pieces.append(piece)
            continue
        ids: list[int] = []
        mask: list[int] = []
        for _, _, bit in cuts[position]:
            segment = list(next(segment_ids))
            ids += segment
            mask += [bit] * len(segment)
        pieces.append(_Literal(piece, ids, mask, tuple(sorted(spans.get(position, ())))))
    return pieces


def _generated_before_reply(fmt: ChatFormat, skeleton_messages: list[dict], index: int, before: str,
                            markers: str) -> str:
    """Template text between the generation prompt and assistant reply `index`, which the model generates.

    `before` is the skeleton up to the reply. The prompt for this turn (messages before it, generation
    prompt appended) is compared with `before` after the last content both share: if the template writes
    more than the generation prompt (Qwen3's empty `<think>\\n\\n</think>\\n\\n`, gpt-oss's
    `<|channel|>final<|message|>`), the extra text is returned. "" when there is none, the generation
    prompt already holds it, the prompt is not a prefix of what the template writes before the reply, or
    the template has no generation prompt (its text before a reply is the reply's header, as before).
    """
    if index == 0:
        return ""
    try:
        prompt = fmt.render_text(skeleton_messages[:index], True)
        if prompt == fmt.render_text(skeleton_messages[:index], False):
            return ""
    except TemplateError:
        return ""
    last = None
    for last in re.finditer(markers, prompt):
        pass
    if last is None:
        generation_prompt, written = prompt, before
    else:
        at = before.rfind(last.group())
        if at < 0:
            return ""
        generation_prompt, written = prompt[last.end():], before[at + 1:]
    if re.search(markers, written) or not written.startswith(generation_prompt):
        return ""
    return written[len(generation_prompt):]


def _next_header_text(fmt: ChatFormat, messages: list[dict], slots, base: int, add_generation_prompt: bool,
                      reply_slot: int) -> str | None:
    """Template text between assistant reply `reply_slot` and the next marked text field, right-stripped,
    rendering with *every* present text field marked (empty ones too); None if that rendering fails."""
    marked = [dict(m) for m in messages]
    reply_marker = None
    extra = len(slots)
    slot_of = {(i, field): j for j, (i, field, _, _) in enumerate(slots)}
    for i, message in enumerate(marked):
        for field in CONTENT_FIELDS:
            if field not in message:
                continue
            j = slot_of.get((i, field))
            if j is None:
                j, extra = extra, extra + 1
            message[field] = chr(base + j)
            if j == reply_slot:
                reply_marker = message[field]
    try:
        rendered = fmt.render_text(marked, add_generation_prompt)
    except TemplateError:
        return None
    at = rendered.find(reply_marker) if reply_marker else -1
    if at < 0:
        return None
    match = re.compile(f"[{chr(base)}-{chr(base + extra - 1)}]").search(rendered, at + 1)
    if match is None:  # no later message: what follows is the generation prompt or nothing
        return ""
    return rendered[at + 1:match.start()].rstrip()


def _get_plan(fmt: ChatFormat, tokenizer, codec: Codec, messages, slots, key, base, n_markers,
              add_generation_prompt) -> _Plan:
    if fmt._plans is None:
        fmt._plans = weakref.WeakKeyDictionary()
    try:
        per_tokenizer = fmt._plans.get(tokenizer)
        if per_tokenizer is None:
            per_tokenizer = fmt._plans[tokenizer] = {}
    except TypeError:
        per_tokenizer = {}
    plan_key = (codec.vocab_size, base, bool(add_generation_prompt), key)
    plan = per_tokenizer.get(plan_key)
    if plan is None:
        if len(per_tokenizer) >= _MAX_PLANS_PER_TOKENIZER:
            per_tokenizer.clear()
        plan = per_tokenizer[plan_key] = _build_plan(fmt, codec, messages, slots, base, n_markers,
                                                     add_generation_prompt)
    return plan


# ----------------------------------------------------------------------------- alignment

def _variants(content: str) -> list[str]:
    out = [content]
    # the last: as `tojson` writes a string between its quotes (Llama 3.1's tool results)
    for v in (content.strip(), content.lstrip(), content.rstrip(), content.strip("\n"), content.lstrip("\n"),
              content.rstrip("\n"), json.dumps(content, ensure_ascii=False)[1:-1]):
        if v not in out:
            out.append(v)
    return out


def _align(fmt: ChatFormat, plan: _Plan, text: str, messages, slots) -> list[str]:
    """The text each slot occurrence has in `text` (content as is or stripped); raises if none fits.

    Depth-first search over the variants with memoised dead ends; in practice the first variant fits.
    """
    pieces = plan.pieces
    values = [slot[2] for slot in slots]
    # Common case: every content inserted verbatim.
    quick = [values[p] if isinstance(p, int) else None for p in pieces]
    if "".join(q if q is not None else p.text for q, p in zip(quick, pieces)) == text:
        return [q for q in quick if q is not None]

    n, length = len(pieces), len(text)
    chosen: list[str | None] = [None] * n
    dead: set[tuple[int, int]] = set()
    stack: list[tuple[int, int, list[str], int]] = []  # (piece index, position, variants, variant tried)
    i, pos, furthest = 0, 0, 0
    while True:
        furthest = max(furthest, i)
        ok = True
        while ok and i < n:
            piece = pieces[i]
            if isinstance(piece, _Literal):
                ok = text.startswith(piece.text, pos)
                if ok:
                    pos += len(piece.text)
                    i += 1
            elif (i, pos) in dead:
                ok = False
            else:
                stack.append((i, pos, _variants(values[piece]), -1))
                ok = False  # let the backtracking loop pick the first fitting variant
                break
            furthest = max(furthest, i)
        if ok and i == n and pos == length:
            return [c for c, p in zip(chosen, pieces) if isinstance(p, int)]  # type: ignore[misc]
        # Advance the innermost open choice to its next fitting variant, unwinding exhausted ones.
        while stack:
            si, spos, variants, tried = stack.pop()
            nxt = next((k for k in range(tried + 1, len(variants)) if text.startswith(variants[k], spos)), None)
            if nxt is None:
                dead.add((si, spos))
                continue
            stack.append((si, spos, variants, nxt))
            chosen[si] = variants[nxt]
            i, pos = si + 1, spos + len(variants[nxt])
            break
        else:
            _raise_misaligned(fmt, plan, messages, slots, furthest)


def _raise_misaligned(fmt, plan, messages, slots, furthest: int):
    pieces = plan.pieces
    slot = next((p for p in reversed(pieces[: furthest + 1]) if isinstance(p, int)), None)
    if slot is None:
        slot = next((p for p in pieces if isinstance(p, int)), None)
    if slot is None:
        raise TemplateError(f"chat template {fmt.name!r} renders differently than its structure predicts")
    i, role = _role_of(messages, slots, slot)
    field = slots[slot][1]
    raise TemplateError(
        f"chat template {fmt.name!r} rewrites message {i} ({role}) or the text around it: its {field!r} does not "
        "appear verbatim or whitespace-stripped where the template puts it, so the assistant mask cannot be made "
        "exact")


# ----------------------------------------------------------------------------- public API

def render_chat(messages: list[dict], tokenizer, fmt: ChatFormat | str | None,
                add_generation_prompt: bool = False, *, verify: bool = True,
                tools: list[dict] | None = None) -> RenderedChat:
    """Render `messages` to `RenderedChat(input_ids (t,), assistant_mask (t,), text)`.

    Mask = 1 exactly on assistant reply tokens and the end-of-turn text closing each reply; 0 on
    system/user text, headers and the generation prompt. `verify` checks `decode(input_ids) == text`
    (and falls back to whole-text tokenization with offsets if segments do not round-trip). `tools`: the
    conversation's function schemas, passed to the template as `apply_chat_template(tools=...)` does; an
    assistant turn with `tool_calls` is trained on, call included, `tool` results are not (chat/tool_calls.py).
    """
    if not isinstance(fmt, ChatFormat):
        fmt = get_format(fmt, tokenizer)
    messages = fold_reasoning(_check_messages(messages), fmt.template)
    if uses_tools(messages, tools):
        fmt = tool_format(fmt, tools, messages)
    slots, key = _slots_and_key(messages)
    n_fields = sum(1 for m in messages for field in CONTENT_FIELDS if field in m)
    base = _sentinel_base([s[2] for s in slots], n_fields + 1)  # + 1: a user message's marker (turn_closings)
    codec = codec_for(tokenizer)
    plan = _get_plan(fmt, tokenizer, codec, messages, slots, key, base, n_fields, add_generation_prompt)

    if fmt.verbatim_contents:
        contents = [slots[p][2] for p in plan.pieces if isinstance(p, int)]
        text = None
    else:
        text = fmt.render_text(messages, add_generation_prompt)
        contents = _align(fmt, plan, text, messages, slots)

    # A content after a literal that joins its final space is tokenized with that space (`_joins_space`).
    encoded = [" " + c if join else c for c, join in zip(contents, plan.joined)] if any(plan.joined) else contents
    content_ids = iter(codec.encode_plain([e for e in encoded if e]))
    contents_iter = iter(zip(contents, encoded))
    ids: list[int] = []
    mask: list[int] = []
    parts: list[str] = []
    for piece in plan.pieces:
        if isinstance(piece, _Literal):
            ids += piece.ids
            mask += piece.mask
            parts.append(piece.text)
        else:
            content, text_encoded = next(contents_iter)
            parts.append(content)
            if text_encoded:
                piece_ids = next(content_ids)
                ids += piece_ids
                mask += [1 if piece in plan.masked_slots else 0] * len(piece_ids)
    if text is None:
        text = "".join(parts)
    if verify and codec.decode(ids) != text:
        ids, mask = _whole_text_tokens(codec, plan, parts, text)
    return RenderedChat(ids, mask, text)


def render_prompt(messages: list[dict], tokenizer, fmt: ChatFormat | str | None,
                  tools: list[dict] | None = None) -> list[int]:
    """Token ids for generation: the conversation rendered with the generation prompt appended.

    Tokenized exactly like `render_chat`, so a prompt's ids are a prefix of the training ids of the same
    conversation continued by a reply.
    """
    return render_chat(messages, tokenizer, fmt, add_generation_prompt=True, tools=tools).input_ids


def _whole_text_tokens(codec: Codec, plan: _Plan, parts: list[str], text: str) -> tuple[list[int], list[int]]:
    """Fallback: tokenize the whole text with offsets; a token is masked if any of its characters is."""
    masked_chars = bytearray(len(text) + 1)
    content_spans: list[tuple[int, int]] = []
    pos = 0
    for piece, part in zip(plan.pieces, parts):
        if isinstance(piece, _Literal):
            for start, end in piece.spans:
                masked_chars[pos + start:pos + end] = b"\x01" * (end - start)
        else:
            content_spans.append((pos, pos + len(part)))
            if piece in plan.masked_slots:
                masked_chars[pos:pos + len(part)] = b"\x01" * len(part)
        pos += len(part)
    ids, offsets = codec.encode_with_offsets(text)
    mask = []
    for token_id, (start, end) in zip(ids, offsets):
        if token_id in codec.control_ids and any(a <= start and end <= b for a, b in content_spans):
            raise DataError(f"a message contains the control token {text[start:end]!r}; this tokenizer cannot "
                            "keep it as plain text (its pieces do not round-trip), remove it from the data")
        mask.append(1 if end > start and any(masked_chars[start:end]) else 0)
    return ids, mask
