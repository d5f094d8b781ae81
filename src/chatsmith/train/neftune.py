"""NEFTune: uniform noise on the input embeddings while fine-tuning (Jain et al. 2023, "NEFTune: Noisy
Embeddings Improve Instruction Finetuning", arXiv:2310.05914). `chatsmith sft --neftune-noise-alpha 5`.

During training each embedding output ``(b, t, d)`` gets ``Uniform(-1, 1) * alpha / sqrt(t * d)`` added
(the paper's scaling; `t` is the row length, padding included, as in the paper). In eval mode and at
inference the embeddings are untouched. The noise is a regulariser against learning replies token by
token: the paper reports better instruction following; here it is offered for SFT like TRL's
`neftune_noise_alpha`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def neftune_noise(embeddings: torch.Tensor, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise for ``embeddings`` (b, t, d): Uniform(-1, 1) scaled by ``alpha / sqrt(t * d)``."""
    b, t, d = embeddings.shape
    scale = alpha / math.sqrt(t * d)
    noise = torch.empty(b, t, d, dtype=torch.float32, device=embeddings.device).uniform_(-1.0, 1.0,
                                                                                       generator=generator)
    return (noise * scale).to(embeddings.dtype)


def add_neftune(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Register the noise on ``model``'s input embeddings (active only while the module is training);
    returns the hook handle (``.remove()`` turns it off)."""
    if alpha <= 0:
        raise ValueError(f"neftune_noise_alpha: expected > 0, got {alpha}")
    embed = model.get_input_embeddings()

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output + neftune_noise(output, alpha) if module.training else output

    return embed.register_forward_hook(hook)
