"""Encode and decode with one tokenizer the way `chat/render.py` needs: template text with special tokens
recognised, message text as plain text (a typed `<|im_end|>` stays text), and the whole text with offsets
for tokenizers whose pieces do not round-trip. One `Codec` per tokenizer, cached (`codec_for`).

Not thread-safe per tokenizer: plain-text encoding flips the fast tokenizer's `encode_special_tokens`
flag for the duration of one call (and restores it).
"""

from __future__ import annotations

import weakref
from typing import Any

from chatsmith.errors import TemplateError

class Codec:
    """Encode template text (special tokens recognised) and message text (plain) with one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)  # caches built with this codec are stale once tokens are added
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        control = set(getattr(tokenizer, "all_special_ids", []) or [])
        for token_id, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
            if getattr(added, "special", False):
                control.add(int(token_id))
        self.control_ids = control

    def _encode(self, texts: list[str], plain: bool) -> list[list[int]]:
        if not texts:
            return []
        if self.backend is None:  # slow (Python) tokenizer
            return [self.tokenizer.encode(t, add_special_tokens=False, split_special_tokens=plain) if t else []
                    for t in texts]
        previous = self.backend.encode_special_tokens
        self.backend.encode_special_tokens = plain
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.backend.encode_special_tokens = previous

    def encode_template(self, texts: list[str]) -> list[list[int]]:
        return self._encode(texts, plain=False)

    def encode_plain(self, texts: list[str]) -> list[list[int]]:
        return self._encode(texts, plain=True)

    def decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if self.backend is not None:
            previous = self.backend.encode_special_tokens
            self.backend.encode_special_tokens = False
            try:
                enc = self.backend.encode(text, add_special_tokens=False)
            finally:
                self.backend.encode_special_tokens = previous
            return list(enc.ids), list(enc.offsets)
        raise TemplateError("this tokenizer cannot tokenize message contents separately (decode(ids) != text) and "
                            "has no offsets mapping (slow tokenizer); use a fast tokenizer")


_CODECS: "weakref.WeakKeyDictionary[Any, Codec]" = weakref.WeakKeyDictionary()


def codec_for(tokenizer) -> Codec:
    try:
        codec = _CODECS.get(tokenizer)
        if codec is None or codec.vocab_size != len(tokenizer):
            codec = _CODECS[tokenizer] = Codec(tokenizer)
        return codec
    except TypeError:  # not weak-referenceable / hashable
        return Codec(tokenizer)
