"""Per-row sampling for continuous batching: every row of a batch keeps its own temperature, top-p,
top-k and random stream, so a sequence samples the same tokens whatever else runs beside it.

    tokens = sample_rows(logits, [RowSampling(0.0), RowSampling(0.8, top_p=0.9, seed=7)])

Greedy rows (temperature 0) take the argmax. Other rows: logits / temperature, top-k and nucleus
(top-p, Holtzman et al. 2019, arXiv:1904.09751) truncation, then the Gumbel-max trick (argmax of logits
plus Gumbel noise is a sample of the softmax) with the row's own ``torch.Generator``. A row draws its
uniforms for up to 16 steps in one call (the per-call cost dominates small models); on the CPU that is
the same stream as one call per step, so a row seeded with ``choice_seed(seed, i)`` samples what row i
of the batch engine (`engine.generate`, which seeds its rows the same way) samples. Rows that run out of
noise together (the rows admitted in one group) draw into one `NoiseBlock` and turn their uniforms into
Gumbel noise in one call; each step reads a slice of it (a view while every row of the block runs).

Used by `continuous.ContinuousBatch` (`chatsmith serve` and the RL rollouts).
Tests: `python -m pytest tests/test_serve_batch.py tests/test_rollout_engine.py -q`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["RowSampling", "NoiseBlock", "NOISE_BUDGET", "sample_rows", "choice_seed"]


def choice_seed(seed: int | None, index: int) -> int:
    """The seed of row ``index`` of a request or batch seeded with ``seed`` (``n`` > 1 gives different
    samples); None = random. The same SplitMix64 mix as the batch engine's per-row seeds."""
    if seed is None:
        return secrets.randbits(62)
    # SplitMix64-style mix so seeds 1 and 2 of choice 0 and 1 do not share streams
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


@dataclass
class RowSampling:
    """One row's sampling settings and random stream (created on the device of the logits)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)
    noise: "NoiseBlock | None" = field(default=None, repr=False)     # the block this row's noise is in
    slot: int = field(default=0, repr=False)                          # its row in that block
    noise_used: int = field(default=0, repr=False)                    # steps of it used

    def noise_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        return self.generator


class NoiseBlock:
    """Negated Gumbel noise ``log(-log u)`` of the rows that ran out of noise together (rows admitted in
    one group): ``values`` ``(rows, k, vocab)``, row j from its own generator, so a row's noise is what it
    would draw alone. Transforming the uniforms of every row in one call instead of one call per row is
    what makes this cheaper; the Gumbel-max sample is ``argmax(logits - values[j, step])``."""

    def __init__(self, rows: Sequence[RowSampling], steps_left: Sequence[int], vocab: int, device: torch.device):
        k = max(1, min(16, max(steps_left), NOISE_BUDGET // max(1, len(rows) * vocab)))
        values = torch.empty(len(rows), k, vocab, device=device)
        for j, row in enumerate(rows):
            torch.rand((k, vocab), generator=row.noise_generator(device), device=device, out=values[j])
            row.noise, row.slot, row.noise_used = self, j, 0
        # -log(-log u) negated: subtracting it gives exactly the sum with the Gumbel noise
        self.values = values.clamp_(min=1e-20, max=1.0 - 1e-7).log_().neg_().log_()
        self.rows, self.steps = len(rows), k


# Floats of noise one block holds at most (16 MiB, as the batch engine): a large vocabulary draws fewer
# steps ahead instead of more memory.
NOISE_BUDGET = 1 << 22


def _noise(rows: Sequence[RowSampling], steps_left: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """The negated Gumbel noise ``(len(rows), vocab)`` of each row's next token, one step of its stream."""
    empty = [j for j, r in enumerate(rows) if r.noise is None or r.noise_used == r.noise.steps]
    if empty:
        NoiseBlock([rows[j] for j in empty], [steps_left[j] for j in empty], vocab, device)
    parts, j = [], 0
    while j < len(rows):          # consecutive rows of one block at one step: one slice (a view when whole)
        block, used = rows[j].noise, rows[j].noise_used
        end = j + 1
        while end < len(rows) and rows[end].noise is block and rows[end].noise_used == used:
            end += 1
        slots = [r.slot for r in rows[j:end]]
        if slots == list(range(block.rows)):
            parts.append(block.values[:, used])
        else:
            parts.append(block.values[torch.tensor(slots, dtype=torch.long, device=device), used])
        for r in rows[j:end]:
            r.noise_used += 1
        j = end
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def sample_rows(logits: torch.Tensor, rows: Sequence[RowSampling],
                steps_left: Sequence[int] | None = None) -> torch.Tensor:
    """logits ``(b, vocab)`` -> token ids ``(b,)``, row i sampled with ``rows[i]``.

    ``steps_left[i]``: how many more tokens row i may sample, this one included (bounds how much noise
    it draws ahead).
    """
    logits = logits.float()
    hot = [i for i, r in enumerate(rows) if r.temperature > 0]
    if not hot:
        return logits.argmax(-1)
    device = logits.device
    index = torch.tensor(hot, dtype=torch.long, device=device) if len(hot) < len(rows) else None
    picked = logits if index is None else logits[index]
    temps = {rows[i].temperature for i in hot}
    top_k = any(0 < rows[i].top_k < picked.shape[-1] for i in hot)
    if temps == {1.0} and not top_k:     # x / 1 is x, and nothing below writes into it: no copy
        scaled = picked
    elif len(temps) == 1:     # one temperature (an RL rollout): a scalar divide, as the batch engine does
        scaled = picked / temps.pop()
    else:
        scaled = picked / torch.tensor([rows[i].temperature for i in hot], device=device)[:, None]   # (h, vocab)
    for j, i in enumerate(hot):
        k = rows[i].top_k
        if 0 < k < scaled.shape[-1]:
            kth = torch.topk(scaled[j], k).values[-1]
            scaled[j] = scaled[j].masked_fill(scaled[j] < kth, float("-inf"))
    top_p = [rows[i].top_p for i in hot]
    if any(p < 1.0 for p in top_p):
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens ranked above it hold >= top_p of the mass (the top one stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= torch.tensor(top_p, device=device)[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    left = steps_left if steps_left is not None else [16] * len(rows)
    noise = _noise([rows[i] for i in hot], [left[i] for i in hot], scaled.shape[-1], device)
    chosen = (scaled - noise).argmax(-1)
    if index is None:      # every row samples (an RL rollout): no argmax of the greedy rows to compute
        return chosen
    tokens = logits.argmax(-1)
    tokens[index] = chosen
    return tokens
