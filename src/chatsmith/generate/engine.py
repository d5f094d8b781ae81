"""The sampling engine: batched, KV-cached text generation for any Hugging Face causal LM.

    from chatsmith.generate import SamplingConfig, generate, stream      # re-exported from here
    out = generate(model, tokenizer, [ids_a, ids_b], SamplingConfig(temperature=0.7, top_p=0.9, seed=1))
    out.texts, out.sequences, out.finished, out.logprobs
    for piece in stream(model, tokenizer, ids_a, SamplingConfig(max_new_tokens=64)):
        print(piece, end="", flush=True)

The logits backends are in `decoders.py`, incremental detokenisation and stop strings in `text.py`.

How it works
- Prompts are left-padded into one batch, so every row's next token sits in the last column.
  Position ids count real tokens only (a padded row starts at position 0 like an unpadded one).
- Two backends compute the next-token logits:
  * ``FastDecoder`` — a hand-written decoder step for Llama-family models (Llama, Qwen2, Mistral:
    RoPE, RMSNorm, SwiGLU, optional q/k/v bias, GQA). It reads the model's own weight tensors (no copy,
    so a policy being trained is always sampled with its current weights), keeps a preallocated static
    KV cache ``(b, kv_heads, prompt+max_new, head_dim)``, builds the attention mask itself and computes
    the LM head on the last position only. Per step it runs ~10 tensor ops per layer instead of the
    module/kwargs/mask-factory machinery of ``model.forward`` + ``model.generate``, which dominates the
    time of a tiny model on a CPU.
  * ``HFDecoder`` — the model's own ``forward`` with ``past_key_values`` (a transformers ``Cache``),
    a 2-D padding mask and explicit position ids. Used for every other model (GPT-2, PEFT/LoRA-wrapped
    or quantised models, ...). Both give the same tokens (tests check it).
- Sampling is done on float32 logits with plain tensor ops (no logits-processor chain): repetition
  penalty (CTRL, Keskar et al. 2019, arXiv:1909.05858: positive logits divided, negative multiplied),
  temperature, top-k, top-p (nucleus, Holtzman et al. 2019, arXiv:1904.09751), then the Gumbel-max
  trick (argmax of logits + Gumbel noise samples from the softmax; Gumbel 1954, see Maddison et al.
  2014, arXiv:1411.0030). Each row has its own ``torch.Generator`` seeded from ``(seed, row index)``,
  so a row's sample does not depend on the other rows of the batch, its padding, or when they finish.
  ``first_row`` offsets the row index: rows split over processes sample what the whole batch would.
- ``logprobs`` are log-probabilities of the sampled tokens under the temperature-scaled distribution
  before top-k/top-p truncation (``log_softmax(logits / T)``; T = 1 for greedy). That is the
  distribution an RL update recomputes, so PPO/GRPO ratios start at exactly 1.
- A prompt repeated in the batch (GRPO's G samples of one prompt) is prefilled once; its KV-cache row is
  then copied to each row that repeats it (``_prefill``). The samples are those of separate prefills.
- Finished rows leave the batch (their KV cache rows are dropped) once enough of them finished to pay
  for the copy. There is one host-device sync per step (the new token ids, needed for stop checks).
- Stop strings are matched on bytes, so a stop string split over several byte-level tokens is found;
  ``.texts`` and ``stream`` never contain it. ``stream`` emits only complete UTF-8 characters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from chatsmith.errors import ChatsmithError
from chatsmith.generate.decoders import FastDecoder, HFDecoder, fast_path_layers
from chatsmith.generate.text import RowText, byte_level_table

__all__ = ["SamplingConfig", "GenerationOutput", "Generator", "generate", "stream", "chat_sampling_config",
           "distinct_rows"]


# ----------------------------------------------------------------------------- public types

@dataclass
class SamplingConfig:
    """How to sample. ``stop_token_ids=()`` means no early stop on a token: pass the eos id or
    the chat format's end-of-turn ids (see :func:`chat_sampling_config`)."""

    max_new_tokens: int = 128
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1.0 = off
    repetition_penalty: float = 1.0   # 1.0 = off; > 1 discourages tokens already in prompt or output
    seed: int | None = None           # None = drawn from torch's global RNG (so set_seed makes it fixed)
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    logprobs: bool = True             # compute .logprobs of the sampled tokens
    first_row: int = 0                # row i draws the random stream of row first_row + i (see below)

    def validate(self) -> None:
        """Refuse values that would sample nonsense; nan and inf fail every comparison here."""
        if not self.max_new_tokens >= 0:
            raise ChatsmithError(f"max_new_tokens: expected >= 0, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise ChatsmithError(f"temperature: expected a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not self.top_k >= 0:
            raise ChatsmithError(f"top_k: expected >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ChatsmithError(f"top_p: expected a value in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ChatsmithError(f"repetition_penalty: expected a finite number > 0 (1 = off), got "
                                 f"{self.repetition_penalty}")
        if any(s == "" for s in self.stop_strings):
            raise ChatsmithError("stop_strings: an empty stop string would stop before the first token")


@dataclass
class GenerationOutput:
    sequences: list[list[int]]            # generated ids only; the stop token is included if one was hit
    texts: list[str]                      # decoded generation, stop string / stop token removed
    finished: list[bool]                  # True when a stop token or stop string ended the row
    logprobs: list[list[float]] | None    # per generated token, see the module docstring
    prompt_lengths: list[int] = field(default_factory=list)


def chat_sampling_config(fmt: Any, tokenizer: Any, **overrides: Any) -> SamplingConfig:
    """A SamplingConfig that stops at the end of an assistant turn of chat format ``fmt``."""
    cfg = SamplingConfig(**overrides)
    ids = list(cfg.stop_token_ids) + [i for i in fmt.stop_token_ids(tokenizer) if i is not None]
    cfg.stop_token_ids = tuple(dict.fromkeys(ids))
    cfg.stop_strings = tuple(dict.fromkeys(list(cfg.stop_strings) + list(fmt.stop_strings)))
    return cfg


# ----------------------------------------------------------------------------- shared prompts

def distinct_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows of a padded batch ``(b, t)`` are the same sequence (same ids and padding).

    Returns ``first`` ``(u,)``, the first row of each distinct sequence, and ``inverse`` ``(b,)``, the
    index into ``first`` of every row, so ``input_ids[first][inverse] == input_ids``. GRPO's G copies of
    a prompt are one distinct row.
    """
    keys = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1).tolist()
    slot: dict[tuple, int] = {}
    first, inverse = [], []
    for i, key in enumerate(map(tuple, keys)):
        if key not in slot:
            slot[key] = len(first)
            first.append(i)
        inverse.append(slot[key])
    device = input_ids.device
    return torch.tensor(first, dtype=torch.long, device=device), torch.tensor(inverse, dtype=torch.long, device=device)


def _prefill(decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """Prefill each distinct prompt once, then copy its cache row to every row that repeats it (GRPO
    samples G responses per prompt: the prompt's keys and values are computed once, not G times)."""
    first, inverse = distinct_rows(input_ids, attention_mask)
    if len(first) == input_ids.shape[0]:
        return decoder.start(input_ids, attention_mask, max_len)
    logits = decoder.start(input_ids[first], attention_mask[first], max_len)
    if not decoder.can_drop_rows:     # a cache that cannot select rows: prefill every row after all
        return decoder.start(input_ids, attention_mask, max_len)
    decoder.keep(inverse)
    return logits[inverse]


# ----------------------------------------------------------------------------- sampling

def _mix_seed(seed: int, row: int) -> int:
    """SplitMix64 finaliser of (seed, row): well-spread, reproducible per-row seeds."""
    z = (seed * 0x9E3779B97F4A7C15 + (row + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


_NOISE_BUDGET = 1 << 22    # floats of Gumbel noise drawn ahead (16 MiB), whatever the batch and vocabulary


def _gumbel_noise(generators: list[torch.Generator], steps_left: int, vocab: int,
                  device: torch.device) -> torch.Tensor:
    """Gumbel noise ``(rows, k, vocab)`` for the next k <= 16 steps, row r from its own generator.

    Drawing k steps' uniforms in one call gives the same numbers as k calls of one step each (a row's
    stream does not depend on the chunking), at 1/k of the per-call cost that dominates small models.
    Gumbel-max: argmax(logit - log(-log u)), u ~ U(0, 1), samples softmax(logit).
    """
    k = max(1, min(16, steps_left, _NOISE_BUDGET // max(1, len(generators) * vocab)))
    noise = torch.empty(len(generators), k, vocab, device=device)
    for r, g in enumerate(generators):
        torch.rand((k, vocab), generator=g, device=device, out=noise[r])
    return -torch.log(-torch.log(noise.clamp_(min=1e-20, max=1.0 - 1e-7)))


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. scaled ``(b, vocab)`` (already / temperature)."""
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold >= top_p of the mass; the top
        # token is always kept
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


class Generator:
    """Holds a model and its tokenizer; ``generate`` and ``stream`` sample from it.

    Works with any HF causal LM; Llama-family models without adapters take the fast hand-written
    decoder (``fast=False`` forces the generic path, e.g. to compare them).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, fast: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.fast = fast

    # --------------------------------------------------------------------- public

    def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig | None = None) -> GenerationOutput:
        """Sample a continuation of every prompt (lists of token ids)."""
        cfg = cfg or SamplingConfig()
        table = byte_level_table(self.tokenizer) if cfg.stop_strings else None
        rows = [RowText(self.tokenizer, table, cfg.stop_strings) for _ in prompts]
        result = None
        for result in self._run(prompts, cfg, rows, track_text=bool(cfg.stop_strings)):
            pass
        return result

    def stream(self, prompt_ids: Sequence[int], cfg: SamplingConfig | None = None) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces (whole characters, stop text removed)."""
        cfg = cfg or SamplingConfig()
        row = RowText(self.tokenizer, byte_level_table(self.tokenizer), cfg.stop_strings)
        for event in self._run([prompt_ids], cfg, [row], track_text=True):
            if isinstance(event, GenerationOutput):
                stop_token_hit = event.finished[0] and row.stop_at is None
                piece = row.new_printable(done=True, stop_token_hit=stop_token_hit)
                if piece:
                    yield piece
                return
            piece = row.new_printable(done=False)
            if piece:
                yield piece

    # --------------------------------------------------------------------- internals

    def _decoder(self, max_len: int) -> Any:
        """The logits backend for sequences of up to ``max_len`` tokens (prompt + generation)."""
        if self.fast is not False:
            found = fast_path_layers(self.model, max_len)
            if found is not None:
                return FastDecoder(self.model, *found)
            if self.fast:
                raise ChatsmithError("fast=True: this model is not a plain Llama-family model, or its sliding "
                                     "attention window is shorter than the sequence")
        return HFDecoder(self.model)

    def _max_positions(self) -> int | None:
        config = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _pad_id(self) -> int:
        for value in (getattr(self.tokenizer, "pad_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                return value
        return 0

    def _run(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, rows: list[RowText],
             track_text: bool) -> Iterator[GenerationOutput | None]:
        """The sampling loop. Yields None after each step (stream prints then), finally the output."""
        cfg.validate()
        prompts = [list(map(int, p)) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ChatsmithError(f"prompt {i} is empty: generation needs at least one token")
        n = len(prompts)
        sequences: list[list[int]] = [[] for _ in range(n)]
        logprob_parts: list[list[torch.Tensor]] = [[] for _ in range(n)]
        finished = [False] * n
        stop_token_hit = [False] * n
        longest = max((len(p) for p in prompts), default=0)
        max_new = cfg.max_new_tokens
        limit = self._max_positions()
        if limit is not None and n:
            if longest >= limit:
                raise ChatsmithError(f"a prompt has {longest} tokens but the model's context is {limit} tokens; "
                                     "shorten it")
            max_new = min(max_new, limit - longest)
        if n == 0 or max_new == 0:
            yield self._output(prompts, sequences, rows, finished, stop_token_hit, logprob_parts, cfg)
            return

        model = self.model
        device = _model_device(model)
        input_ids = torch.full((n, longest), self._pad_id(), dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, p in enumerate(prompts):                   # left padding: last column = last real token
            input_ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, longest - len(p):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

        greedy = cfg.temperature == 0
        generators: list[torch.Generator] = []
        if not greedy:
            seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            for i in range(n):
                g = torch.Generator(device=device)
                g.manual_seed(_mix_seed(seed, cfg.first_row + i))
                generators.append(g)
        stop_ids = torch.tensor(sorted({int(t) for t in cfg.stop_token_ids}), dtype=torch.long, device=device)
        check_stop_ids = stop_ids.numel() > 0
        penalty = cfg.repetition_penalty

        was_training = model.training
        model.eval()   # no dropout while sampling; restored below (RL samples from a policy in training)
        try:
            with torch.inference_mode():
                decoder = self._decoder(longest + max_new)
                logits = _prefill(decoder, input_ids, attention_mask, longest + max_new)  # (n, vocab)
                vocab = logits.shape[-1]
                seen = None                                                               # (live, vocab)
                if penalty != 1.0:
                    seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
                    seen.scatter_(1, input_ids.clamp(max=vocab - 1), attention_mask.bool())
                live = list(range(n))        # original index of each live row
                decoder_rows = None          # live row -> decoder batch row, None = identity
                finished_in_decoder = 0      # finished rows the decoder still carries
                gumbel = None                # (live, steps, vocab) noise for the next steps
                noise_step = 0
                for step in range(max_new):
                    logits = logits.float()
                    if seen is not None:
                        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
                        logits = torch.where(seen, penalised, logits)
                    if greedy:
                        scaled = logits
                        tokens = logits.argmax(-1)
                    else:
                        scaled = logits / cfg.temperature
                        filtered = _filter_top_k_top_p(scaled, cfg.top_k, cfg.top_p)
                        if gumbel is None or noise_step == gumbel.shape[1]:
                            gumbel = _gumbel_noise(generators, max_new - step, vocab, device)
                            noise_step = 0
                        tokens = (filtered + gumbel[:, noise_step]).argmax(-1)
                        noise_step += 1
                    if cfg.logprobs:
                        chosen = scaled.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)
                    if seen is not None:
                        seen[torch.arange(len(live), device=device), tokens] = True
                    if check_stop_ids:                                      # one host sync per step
                        token_list, stop_list = torch.stack([tokens, torch.isin(tokens, stop_ids).long()]).tolist()
                    else:
                        token_list, stop_list = tokens.tolist(), None
                    done: list[int] = []
                    for r, orig in enumerate(live):
                        tok = token_list[r]
                        sequences[orig].append(tok)
                        if cfg.logprobs:
                            logprob_parts[orig].append(chosen[r:r + 1])
                        hit_string = rows[orig].push(tok) if track_text else False
                        if stop_list is not None and stop_list[r]:
                            finished[orig] = stop_token_hit[orig] = True
                            done.append(r)
                        elif hit_string:
                            finished[orig] = True
                            done.append(r)
                    yield None
                    if step == max_new - 1 or len(done) == len(live):
                        break
                    if done:
                        keep = [r for r in range(len(live)) if r not in set(done)]
                        keep_index = torch.tensor(keep, device=device)
                        live = [live[r] for r in keep]
                        generators = [generators[r] for r in keep] if generators else generators
                        gumbel = gumbel[keep_index] if gumbel is not None else None
                        tokens = tokens[keep_index]
                        seen = seen[keep_index] if seen is not None else None
                        decoder_rows = keep_index if decoder_rows is None else decoder_rows[keep_index]
                        finished_in_decoder += len(done)
                        # dropping cache rows copies the cache (about one step's work): do it once at
                        # least a quarter of the decoder's rows are finished
                        if decoder.can_drop_rows and finished_in_decoder * 4 >= len(live) + finished_in_decoder:
                            decoder.keep(decoder_rows)
                            decoder_rows, finished_in_decoder = None, 0
                    if decoder_rows is None:
                        logits = decoder.step(tokens)
                    else:   # finished rows still in the decoder get a dummy token; their logits are dropped
                        full = tokens.new_zeros(decoder.batch_size)
                        full[decoder_rows] = tokens
                        logits = decoder.step(full)[decoder_rows]
        finally:
            if was_training:
                model.train()
        yield self._output(prompts, sequences, rows, finished, stop_token_hit, logprob_parts, cfg)

    def _output(self, prompts, sequences, rows, finished, stop_token_hit, logprob_parts,
                cfg: SamplingConfig) -> GenerationOutput:
        texts = []
        for i, seq in enumerate(sequences):
            row = rows[i]
            if len(row.ids) != len(seq):     # rows were not tracked token by token (no stop strings)
                row.ids = list(seq)
            texts.append(row.final_text(stop_token_hit[i]))
        logprobs = None
        if cfg.logprobs:
            logprobs = [torch.cat(parts).tolist() if parts else [] for parts in logprob_parts]
        return GenerationOutput(sequences=sequences, texts=texts, finished=finished, logprobs=logprobs,
                                prompt_lengths=[len(p) for p in prompts])


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


# ----------------------------------------------------------------------------- module-level API

def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]],
             cfg: SamplingConfig | None = None, *, fast: bool | None = None) -> GenerationOutput:
    """Batched sampling. prompts: token id lists (any lengths; left-padded internally)."""
    return Generator(model, tokenizer, fast=fast).generate(prompts, cfg)


def stream(model: nn.Module, tokenizer: Any, prompt_ids: Sequence[int], cfg: SamplingConfig | None = None,
           *, fast: bool | None = None) -> Iterator[str]:
    """Text pieces of one prompt's continuation as they are sampled (never a split character)."""
    return Generator(model, tokenizer, fast=fast).stream(prompt_ids, cfg)
