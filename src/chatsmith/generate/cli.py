"""`chatsmith generate MODEL --prompt TEXT`: raw completion of a prompt (no chat template; what a base
model does), streamed to stdout.

    chatsmith generate runs/base --prompt "The capital of Veldoria is" --temperature 0
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any

from chatsmith.config import SEED_MAX, arg, validate_config
from chatsmith.errors import ChatsmithError
from chatsmith.generate.engine import SamplingConfig, stream
from chatsmith.utils import note

__all__ = ["GenerateConfig", "generate_cli", "cap_new_tokens", "note_context_cap"]


@dataclass
class GenerateConfig:
    model: str = arg("", "Model directory (any local Hugging Face causal LM).")
    prompt: str = arg("", "Text to continue (raw: no chat template is applied).")
    max_new_tokens: int = arg(128, "Most tokens to generate.", min=1)
    temperature: float = arg(0.8, "Sampling temperature; 0 = greedy.", min=0)
    top_k: int = arg(0, "Sample among the k most likely tokens only (0 = off).", min=0)
    top_p: float = arg(1.0, "Nucleus sampling: smallest set of tokens holding this probability (1 = off).",
                       min=0, min_exclusive=True, max=1)
    repetition_penalty: float = arg(1.0, "Penalise tokens already present (1 = off, 1.1-1.3 typical).",
                                    min=0, min_exclusive=True)
    seed: int | None = arg(None, "Random seed (same seed, same output).", min=0, max=SEED_MAX)
    stop: list[str] = arg([], "Stop when one of these strings is generated (it is not printed).")
    ignore_eos: bool = arg(False, "Keep going past the end-of-text token.")
    device: str = arg("auto", "cpu, cuda, mps or auto.")


def cap_new_tokens(max_new_tokens: int, prompt_tokens: int, context: int, flag: str = "--max-new-tokens") -> int:
    """``max_new_tokens`` capped so prompt + reply fit the model's context, with a notice when it is cut."""
    room = max(0, context - prompt_tokens)
    if max_new_tokens > room:
        note(f"{flag} {max_new_tokens}: capped to {room} (the model's context is {context} tokens, the prompt "
             f"takes {prompt_tokens})")
        return room
    return max_new_tokens


def note_context_cap(model: Any, tokenizer: Any, longest_prompt: int, max_new_tokens: int) -> None:
    """For batched callers (eval), whose engine caps each batch to the model's context: say so when a
    prompt of ``longest_prompt`` tokens leaves less room than ``max_new_tokens``, once per value."""
    from chatsmith.model import max_context_length

    context = max_context_length(model, tokenizer)
    if max_new_tokens > context - longest_prompt:
        say_capped(max_new_tokens, context)


@functools.lru_cache(maxsize=None)
def say_capped(max_new_tokens: int, context: int) -> None:
    note(f"--max-new-tokens {max_new_tokens}: capped so that prompt + reply fit the model's context of {context} "
         "tokens")


def generate_cli(cfg: GenerateConfig) -> int:
    """`chatsmith generate MODEL --prompt TEXT`: stream the raw continuation to stdout."""
    validate_config(cfg)              # every setting, before any work (Python callers too)
    from chatsmith.model import load_model, max_context_length

    if not cfg.model:
        raise ChatsmithError("generate: give a model directory (chatsmith generate MODEL --prompt TEXT)")
    if not cfg.prompt:
        raise ChatsmithError("--prompt: give the text to continue")
    loaded = load_model(cfg.model, device=cfg.device, require_template=False)
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(cfg.prompt, add_special_tokens=False)
    if not ids:
        raise ChatsmithError("--prompt: the prompt encodes to no tokens")
    max_new = cap_new_tokens(cfg.max_new_tokens, len(ids), max_context_length(loaded.model, tokenizer))
    stop_ids = [] if cfg.ignore_eos or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    sampling = SamplingConfig(max_new_tokens=max_new, temperature=cfg.temperature, top_k=cfg.top_k,
                              top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed,
                              stop_token_ids=tuple(stop_ids), stop_strings=tuple(cfg.stop), logprobs=False)
    out = sys.stdout
    for piece in stream(loaded.model, tokenizer, ids, sampling):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return 0
