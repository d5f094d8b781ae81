"""Data for every stage: reading and validating user files, packing.

Kept import-light on purpose (no torch, no pyarrow here): `chatsmith.data.formats` reads files,
`chatsmith.data.packing` packs token sequences (imports torch), `chatsmith.data.check` is the
`chatsmith data check FILE` command. The built-in synthetic world lives in `chatsmith.world`.

The most used names are re-exported lazily, so ``from chatsmith.data import load_examples`` works
without importing the submodules up front.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_examples": "chatsmith.data.formats",
    "detect_format": "chatsmith.data.formats",
    "fit_to_length": "chatsmith.data.formats",
    "TextExample": "chatsmith.data.formats",
    "ChatExample": "chatsmith.data.formats",
    "PreferenceExample": "chatsmith.data.formats",
    "LoadResult": "chatsmith.data.formats",
    "BadRow": "chatsmith.data.formats",
    "pack_sequences": "chatsmith.data.packing",
    "collate_packed": "chatsmith.data.packing",
    "PackedBatch": "chatsmith.data.packing",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'chatsmith.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
