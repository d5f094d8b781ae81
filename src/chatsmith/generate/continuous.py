"""Continuous batching: the one decode loop that `chatsmith serve` and the RL rollouts (PPO, GRPO, `rlhf`)
sample through.

    core = ContinuousBatch(model, pad_id)
    core.admit(rows, push)     # prefill new rows (a repeated prompt once), sample their first token
    core.step(push)            # one decode step for every running row; finished rows leave at once

A row is any object with ``prompt`` (token ids), ``max_new``, ``sampling`` (a `RowSampling`) and
``tokens`` (the ids sampled so far, appended here). ``push(row, token) -> bool`` is the caller's: it
sees each new token (stop strings, streaming, cancellation) and says whether the row is finished.
`serve.scheduler.Scheduler` runs the core in a thread for requests that arrive at any time;
:func:`generate_continuous` runs it for a known list of prompts, at most ``max_batch`` rows at a time:
finished rows leave and queued prompts join at the next step, so a rollout of responses of very
different lengths never computes rows that are already done.

Sampling is exact: row i of a call seeded with ``seed`` draws from ``choice_seed(seed, first_row + i)``,
the stream row i of the batch engine (`engine.generate`) draws from, whatever the batch around it, so the
same seed gives the same rollout with any ``max_batch``, and greedy decoding gives the batch engine's
tokens (up to float rounding of batched matmuls; tests/test_rollout_engine.py checks both).

Tests: `python -m pytest tests/test_rollout_engine.py tests/test_serve_batch.py -q`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from chatsmith.errors import ChatsmithError
from chatsmith.generate.batch import DecodeBatch
from chatsmith.generate.engine import GenerationOutput, SamplingConfig
from chatsmith.generate.row_sampling import RowSampling, choice_seed, sample_rows
from chatsmith.generate.text import RowText, byte_level_table
from chatsmith.model import set_training

__all__ = ["ContinuousBatch", "SequenceRow", "generate_continuous"]

Push = Callable[[Any, int], bool]


class ContinuousBatch:
    """The running rows of one model and the decode step they share (see the module docstring)."""

    def __init__(self, model: nn.Module, pad_id: int = 0):
        self.batch = DecodeBatch(model, pad_id=pad_id)
        self.running: list[Any] = []
        self.steps = 0              # decode steps run, and rows fed over all of them (mean batch size)
        self.rows_stepped = 0

    @property
    def can_merge(self) -> bool:
        """False for models whose cache cannot take rows while others run (they start when it is empty)."""
        return self.batch.can_merge

    def admit(self, rows: Sequence[Any], push: Push) -> None:
        """Prefill ``rows`` as one group, sample and push their first tokens; the unfinished ones join."""
        room = max(row.max_new for row in rows) if self.batch.decoder is None else 0
        group, logits = self.batch.prefill([row.prompt for row in rows], room)
        tokens = sample_rows(logits, [row.sampling for row in rows], [row.max_new for row in rows]).tolist()
        keep = [i for i, (row, token) in enumerate(zip(rows, tokens)) if not _push(row, token, push)]
        if not keep:
            return
        if len(keep) < len(rows):
            group.keep(torch.tensor(keep, dtype=torch.long, device=group.positions.device))
        joined = [rows[i] for i in keep]
        self.batch.merge(group, [row.max_new - len(row.tokens) for row in self.running + joined])
        self.running += joined

    def step(self, push: Push) -> None:
        """Feed every running row its last token, sample and push the next; finished rows leave."""
        device = self.batch.decoder.positions.device
        last = torch.tensor([row.tokens[-1] for row in self.running], dtype=torch.long, device=device)
        logits = self.batch.step(last)                                       # (rows, vocab)
        self.steps += 1
        self.rows_stepped += len(self.running)
        tokens = sample_rows(logits, [row.sampling for row in self.running],
                             [row.max_new - len(row.tokens) for row in self.running]).tolist()
        self.drop([i for i, (row, token) in enumerate(zip(self.running, tokens)) if _push(row, token, push)])

    def drop(self, indices: Sequence[int]) -> None:
        """Remove the running rows at ``indices`` from the batch (their cache rows go at once)."""
        gone = set(indices)
        if not gone:
            return
        keep = [i for i in range(len(self.running)) if i not in gone]
        self.batch.keep(keep)
        self.running = [self.running[i] for i in keep]

    def clear(self) -> None:
        """Forget every running row (after an error)."""
        self.running = []
        self.batch.decoder = None


def _push(row: Any, token: int, push: Push) -> bool:
    row.tokens.append(token)
    return push(row, token)


# ----------------------------------------------------------------------------- a known list of prompts

@dataclass
class SequenceRow:
    """One prompt of :func:`generate_continuous` and what was sampled for it."""

    index: int
    prompt: list[int]
    max_new: int
    sampling: RowSampling
    text: RowText
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    stop_token_hit: bool = False


def generate_continuous(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]],
                        cfg: SamplingConfig | None = None, max_batch: int = 0) -> GenerationOutput:
    """Sample a continuation of every prompt through a `ContinuousBatch` of at most ``max_batch`` rows
    (0 = all at once). Prompts join in order; a prompt repeated among those that join together is
    prefilled once. Supports what RL sampling and serving use: temperature, top-k, top-p, stop token ids
    and stop strings (``repetition_penalty`` is the batch engine's). ``.logprobs`` is None (RL recomputes
    them in one forward pass). Returns the same `GenerationOutput` as `engine.generate`.
    """
    cfg = cfg or SamplingConfig()
    cfg.validate()
    if cfg.repetition_penalty != 1.0:
        raise ChatsmithError("repetition_penalty: continuous batching samples without it; use "
                             "chatsmith.generate.generate")
    rows = _rows(model, tokenizer, prompts, cfg)
    stop_ids = frozenset(int(t) for t in cfg.stop_token_ids)
    track_text = bool(cfg.stop_strings)

    def push(row: SequenceRow, token: int) -> bool:
        hit_string = row.text.push(token) if track_text else False
        if token in stop_ids:
            row.finished = row.stop_token_hit = True
        elif hit_string:
            row.finished = True
        return row.finished or len(row.tokens) >= row.max_new

    waiting = deque(row for row in rows if row.max_new > 0)
    cap = max_batch if max_batch > 0 else max(1, len(waiting))
    core = ContinuousBatch(model, pad_id=_pad_id(tokenizer))
    was_training = model.training
    set_training(model, False)   # no dropout while sampling; restored below (RL samples from a policy in training)
    try:
        with torch.inference_mode():
            while waiting or core.running:
                free = cap - len(core.running)
                if waiting and free > 0 and (core.can_merge or not core.running):
                    core.admit([waiting.popleft() for _ in range(min(free, len(waiting)))], push)
                if core.running:
                    core.step(push)
    finally:
        set_training(model, was_training)
    texts = []
    for row in rows:
        if len(row.text.ids) != len(row.tokens):     # not tracked token by token (no stop strings)
            row.text.ids = list(row.tokens)
        texts.append(row.text.final_text(row.stop_token_hit))
    return GenerationOutput(sequences=[row.tokens for row in rows], texts=texts,
                            finished=[row.finished for row in rows], logprobs=None,
                            prompt_lengths=[len(row.prompt) for row in rows])


def _rows(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> list[SequenceRow]:
    """One `SequenceRow` per prompt; each row's token budget is capped by the model's context."""
    from chatsmith.model import max_context_length

    limit = max_context_length(model)
    seed = cfg.seed
    if cfg.temperature > 0 and seed is None:     # drawn from torch's global RNG, as the batch engine does
        seed = int(torch.randint(0, 2**62, (1,)).item())
    table = byte_level_table(tokenizer) if cfg.stop_strings else None
    rows = []
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ChatsmithError(f"prompt {i} is empty: generation needs at least one token")
        if len(prompt) >= limit:
            raise ChatsmithError(f"a prompt has {len(prompt)} tokens but the model's context is {limit} tokens; "
                                 "shorten it")
        sampling = (RowSampling(0.0) if cfg.temperature == 0 else
                    RowSampling(cfg.temperature, cfg.top_p, cfg.top_k, choice_seed(seed, cfg.first_row + i)))
        rows.append(SequenceRow(i, prompt, min(cfg.max_new_tokens, limit - len(prompt)), sampling,
                                RowText(tokenizer, table, cfg.stop_strings)))
    return rows


def _pad_id(tokenizer: Any) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0
