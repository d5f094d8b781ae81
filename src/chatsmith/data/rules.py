"""Which rows a training stage keeps: one function per rule, called by the stages and by
`chatsmith data check --for STAGE`, so the check and the run cannot disagree.

    sequences_fit([120, 300], max_len=256)          # False: a preference row is dropped, never cut
    prompt_budget(max_len=256, max_new_tokens=48)    # 208: longest prompt a sampling stage keeps
    require_rows(kept, "data/sft.jsonl", "no conversation left to train on", detail)   # DataError if none

The SFT rules (cut at a turn boundary or drop, then refuse conversations without assistant tokens) live in
`chatsmith.train.sft.prepare_examples`, built on `chatsmith.data.formats.fit_to_length`; preference rows
go through `chatsmith.train.preference_data.tokenize_preferences`, prompts through
`chatsmith.train.rollout.select_prompts`. Each of them applies the rules below.

Run the tests: `python -m pytest tests/test_data_check.py tests/test_validation.py -q`.
"""

from __future__ import annotations

from typing import Sequence

from chatsmith.errors import DataError

__all__ = ["STAGE_KINDS", "sequences_fit", "prompt_budget", "prompt_fits", "require_rows"]

# Which kind of data each training command reads (`chatsmith.data.records.KINDS`).
STAGE_KINDS = {"pretrain": "text", "sft": "chat", "reward": "preference", "dpo": "preference",
               "ppo": "prompt", "grpo": "prompt"}


def sequences_fit(lengths: Sequence[int], max_len: int) -> bool:
    """A preference row (prompt + each response, up to the response's end-of-turn) is kept only if every one
    of its sequences fits in ``max_len`` tokens. It is never cut: cutting the prompt's start changes the
    question, and cutting a response changes what was compared."""
    return all(n <= max_len for n in lengths)


def prompt_budget(max_len: int, max_new_tokens: int) -> int:
    """The longest rendered prompt a sampling stage (ppo, grpo) keeps: the response needs the rest."""
    return max_len - max_new_tokens


def prompt_fits(n_tokens: int, max_len: int, max_new_tokens: int) -> bool:
    """A prompt is kept whole or dropped (a cut prompt is a different question)."""
    return n_tokens <= prompt_budget(max_len, max_new_tokens)


def require_rows(kept: Sequence[object], source: str, what: str, detail: str = "") -> None:
    """A stage with no row left after its rules stops here, naming the file and why."""
    if not kept:
        raise DataError(f"{source}: {what}" + (f" ({detail})" if detail else ""))
