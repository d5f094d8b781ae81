"""Per-row sampling for the serving scheduler: every row of a batch keeps its own temperature, top-p,
top-k and random stream, so a request samples the same tokens whatever else runs beside it.

    tokens = sample_rows(logits, [RowSampling(0.0), RowSampling(0.8, top_p=0.9, seed=7)])

Greedy rows (temperature 0) take the argmax. Other rows: logits / temperature, top-k and nucleus
(top-p, Holtzman et al. 2019, arXiv:1904.09751) truncation, then the Gumbel-max trick (argmax of logits
plus Gumbel noise is a sample of the softmax) with the row's own ``torch.Generator``.

Tests: `python -m pytest tests/test_serve_batch.py -q`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["RowSampling", "sample_rows", "choice_seed"]


def choice_seed(seed: int | None, index: int) -> int:
    """The seed of choice ``index`` of a request (``n`` > 1 gives different samples); None = random."""
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

    def noise_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        return self.generator


def sample_rows(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """logits ``(b, vocab)`` -> token ids ``(b,)``, row i sampled with ``rows[i]``."""
    logits = logits.float()
    tokens = logits.argmax(-1)
    hot = [i for i, r in enumerate(rows) if r.temperature > 0]
    if not hot:
        return tokens
    device = logits.device
    index = torch.tensor(hot, dtype=torch.long, device=device)
    temps = torch.tensor([rows[i].temperature for i in hot], device=device)
    scaled = logits[index] / temps[:, None]                                       # (h, vocab)
    for j, i in enumerate(hot):
        k = rows[i].top_k
        if 0 < k < scaled.shape[-1]:
            kth = torch.topk(scaled[j], k).values[-1]
            scaled[j] = scaled[j].masked_fill(scaled[j] < kth, float("-inf"))
    top_p = torch.tensor([rows[i].top_p for i in hot], device=device)
    if bool((top_p < 1.0).any()):
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens ranked above it hold >= top_p of the mass (the top one stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    uniform = torch.stack([torch.rand(scaled.shape[-1], generator=rows[i].noise_generator(device), device=device)
                           for i in hot])
    gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1.0 - 1e-7)))
    tokens[index] = (scaled + gumbel).argmax(-1)
    return tokens
