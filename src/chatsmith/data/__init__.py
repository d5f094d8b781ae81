"""Data for every stage: reading and validating user files, packing.

Kept import-light on purpose (no torch, no pyarrow here): `chatsmith.data.formats` reads files,
`chatsmith.data.records` detects, validates and converts their rows,
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
    "detect_format": "chatsmith.data.records",
    "fit_to_length": "chatsmith.data.formats",
    "TextExample": "chatsmith.data.records",
    "ChatExample": "chatsmith.data.records",
    "PreferenceExample": "chatsmith.data.records",
    "LoadResult": "chatsmith.data.formats",
    "load_preferences": "chatsmith.data.formats",
    "split_train_eval": "chatsmith.data.formats",
    "BadRow": "chatsmith.data.records",
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
