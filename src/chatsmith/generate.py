"""The sampling engine: batched, KV-cached text generation for any Hugging Face causal LM.

    from chatsmith.generate import SamplingConfig, generate, stream
    out = generate(model, tokenizer, [ids_a, ids_b], SamplingConfig(temperature=0.7, top_p=0.9, seed=1))
    out.texts, out.sequences, out.finished, out.logprobs
    for piece in stream(model, tokenizer, ids_a, SamplingConfig(max_new_tokens=64)):
        print(piece, end="", flush=True)

Command line (raw completion, no chat template; what a base model does):

    chatsmith generate runs/base --prompt "The capital of Veldoria is" --temperature 0

How it works
- Prompts are left-padded into one batch, so every row's next token sits in the last column.
  Position ids count real tokens only (a padded row starts at position 0 like an unpadded one).
- Two backends compute the next-token logits:
  * ``_FastDecoder`` — a hand-written decoder step for Llama-family models (Llama, Qwen2, Mistral:
    RoPE, RMSNorm, SwiGLU, optional q/k/v bias, GQA). It reads the model's own weight tensors (no copy,
    so a policy being trained is always sampled with its current weights), keeps a preallocated static
    KV cache ``(b, kv_heads, prompt+max_new, head_dim)``, builds the attention mask itself and computes
    the LM head on the last position only. Per step it runs ~10 tensor ops per layer instead of the
    module/kwargs/mask-factory machinery of ``model.forward`` + ``model.generate``, which dominates the
    time of a tiny model on a CPU.
  * ``_HFDecoder`` — the model's own ``forward`` with ``past_key_values`` (a transformers ``Cache``),
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

import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from chatsmith.config import arg
from chatsmith.errors import ChatsmithError
from chatsmith.model import cache_keyword, returned_cache

__all__ = ["SamplingConfig", "GenerationOutput", "Generator", "generate", "stream", "GenerateConfig",
           "generate_cli", "chat_sampling_config", "clear_weight_cache", "distinct_rows"]


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
        if self.max_new_tokens < 0:
            raise ChatsmithError(f"max_new_tokens: expected >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ChatsmithError(f"temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ChatsmithError(f"top_k: expected >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ChatsmithError(f"top_p: expected a value in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ChatsmithError(f"repetition_penalty: expected > 0 (1 = off), got {self.repetition_penalty}")
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


# ----------------------------------------------------------------------------- token bytes

_BYTES_CACHE: "weakref.WeakKeyDictionary[Any, list[bytes] | None]" = weakref.WeakKeyDictionary()


def _byte_level_table(tokenizer: Any) -> list[bytes] | None:
    """id -> raw bytes for GPT-2-style byte-level BPE tokenizers (None for any other kind).

    Byte-level BPE writes each byte as one printable unicode character (the GPT-2 byte alphabet);
    inverting that map gives the exact bytes of every token, which lets us find stop strings and
    UTF-8 character boundaries without re-decoding the whole text at every step.
    """
    try:
        return _BYTES_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    table = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
        byte_of = _gpt2_unicode_to_byte()
        vocab_size = len(tokenizer)
        table = [b""] * vocab_size
        added = {i for i in getattr(tokenizer, "added_tokens_decoder", {})}
        for token, idx in tokenizer.get_vocab().items():
            if idx >= vocab_size:
                continue
            if idx in added:        # added/special tokens are stored as plain text
                table[idx] = token.encode("utf-8")
            elif all(ch in byte_of for ch in token):
                table[idx] = bytes(byte_of[ch] for ch in token)
            else:                   # not a byte-level vocabulary after all
                table = None
                break
    try:
        _BYTES_CACHE[tokenizer] = table
    except TypeError:
        pass
    return table


def _gpt2_unicode_to_byte() -> dict[str, int]:
    # The reversible byte <-> printable-character map of GPT-2's byte-level BPE (Radford et al. 2019):
    # printable latin-1 bytes map to themselves, the other 68 bytes to chr(256 + n).
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class _RowText:
    """Incremental detokenizer for one row: stop-string search and safe-to-print text.

    With a byte table (byte-level BPE) it keeps the raw bytes generated so far; otherwise it re-decodes
    the ids (slower, used only by non-byte-level tokenizers and only when needed).
    """

    def __init__(self, tokenizer: Any, table: list[bytes] | None, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.table = table
        self.stop_texts = list(stop_strings)
        self.stop_bytes = [s.encode("utf-8") for s in stop_strings]
        self.ids: list[int] = []
        self.data = bytearray()          # byte-table path: every generated byte
        self.text = ""                   # fallback path: decode(ids), refreshed by push when needed
        self.stop_at: int | None = None  # byte (table path) or character offset where a stop string starts
        self.emitted = 0                 # how much stream() already printed (same unit as stop_at)

    def push(self, token_id: int) -> bool:
        """Append a token; True if a stop string now occurs in the output."""
        self.ids.append(token_id)
        if self.table is not None:
            before = len(self.data)
            self.data += self.table[token_id] if token_id < len(self.table) else b""
            # a new hit must end inside the new bytes, so it starts after before - len(stop)
            hits = [self.data.find(s, max(0, before - len(s) + 1)) for s in self.stop_bytes]
        elif self.stop_texts:
            before = len(self.text)
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
            hits = [self.text.find(s, max(0, before - len(s))) for s in self.stop_texts]
        else:
            return False
        hits = [h for h in hits if h >= 0]
        if hits:
            self.stop_at = min(hits)
            return True
        return False

    def final_text(self, stop_token_hit: bool) -> str:
        """The whole generation as text, stop string / stop token removed."""
        if self.stop_at is not None:
            if self.table is not None:
                return bytes(self.data[: self.stop_at]).decode("utf-8", errors="replace")
            return self.text[: self.stop_at]
        ids = self.ids[:-1] if stop_token_hit else self.ids
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def new_printable(self, done: bool, stop_token_hit: bool = False) -> str:
        """Text that can be printed now: whole UTF-8 characters, never part of a stop string."""
        if self.table is None:
            if done:
                full = self.final_text(stop_token_hit)
            else:
                full = self.tokenizer.decode(self.ids, skip_special_tokens=False)
                if full.endswith("\ufffd"):         # the last character is not complete yet
                    return ""
                full = full[: len(full) - _held_back(full, self.stop_texts)]
            piece = full[self.emitted:]
            self.emitted = max(self.emitted, len(full))
            return piece
        if self.stop_at is not None:
            end = self.stop_at
        elif stop_token_hit and self.ids[-1] < len(self.table):
            end = len(self.data) - len(self.table[self.ids[-1]])
        else:
            end = len(self.data)
        if not done:
            end -= _held_back(bytes(self.data[:end]), self.stop_bytes)
            end = _utf8_safe_end(self.data, end)
        if end <= self.emitted:
            return ""
        piece = bytes(self.data[self.emitted:end]).decode("utf-8", errors="replace")
        self.emitted = end
        return piece


def _held_back(data: Any, stops: Sequence[Any]) -> int:
    """Length of the longest suffix of ``data`` that is a proper prefix of a stop string (str or bytes):
    that much must wait, it may be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(data)), best, -1):
            if data.endswith(s[:k]):
                best = k
                break
    return best


def _utf8_safe_end(data: bytearray, end: int) -> int:
    """Largest e <= end such that data[:e] does not end inside a UTF-8 character."""
    i = end - 1
    back = 0
    while i >= 0 and back < 4 and (data[i] & 0xC0) == 0x80:   # continuation bytes 10xxxxxx
        i -= 1
        back += 1
    if i < 0:
        return end
    lead = data[i]
    need = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if (
        lead >> 3 == 0b11110) else 1
    return end if back + 1 >= need else i


# ----------------------------------------------------------------------------- decoders (logits backends)

def _fast_path_layers(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(inner model, lm_head) if ``model`` is a plain Llama-family model our fast step reproduces exactly."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in ("llama", "qwen2", "mistral"):
        return None
    inner, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if inner is None or type(head) is not nn.Linear or head.bias is not None:
        return None
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return None
    if getattr(config, "mlp_bias", False):
        return None
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(inner, n) for n in needed) or type(inner.embed_tokens) is not nn.Embedding:
        return None
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or getattr(attn, "sliding_window", None):
            return None
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return None
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
            getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(m) is not nn.Linear for m in linears):   # PEFT/LoRA, int8, ... take the generic path
            return None
        if not hasattr(layer.input_layernorm, "variance_epsilon"):
            return None
    if sum(p.numel() for p in model.parameters()) > FAST_PATH_MAX_PARAMETERS:
        return None
    return inner, head


class _LayerWeights(NamedTuple):
    """One layer's weights laid out for ``x @ W`` with x ``(rows, in)``: every matrix is a contiguous
    ``(in, out)`` copy. On a CPU that is about 2x faster than ``F.linear``'s ``(out, in)`` layout for the
    one-row matmuls of decoding (measured: 150 vs 320 us for a 256x768 layer, cold cache, 1 thread)."""

    norm1: torch.Tensor         # (d,)
    qkv: torch.Tensor           # (d, n_heads*hd + 2*n_kv*hd): q, k, v projections side by side
    qkv_bias: torch.Tensor | None
    o: torch.Tensor             # (n_heads*hd, d)
    o_bias: torch.Tensor | None
    norm2: torch.Tensor
    gate_up: torch.Tensor       # (d, 2*ffn): gate and up projections side by side
    down: torch.Tensor          # (ffn, d)
    eps: float


# The fast path keeps a re-laid-out copy of the weights (see _LayerWeights), so it is used only for
# models up to this size; bigger ones take the generic path, where compute dominates anyway.
FAST_PATH_MAX_PARAMETERS = 600_000_000

# Copies per model, rebuilt when any source tensor changed (an optimizer step, `load_state_dict` or any
# in-place op bumps a parameter's version counter), so an RL policy is always sampled with its current
# weights. Writes through `param.data` bypass the counter: call clear_weight_cache(model) after those.
_FUSED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Any]]" = weakref.WeakKeyDictionary()


def _fused_weights(model: nn.Module, inner: nn.Module, head: nn.Module) -> tuple[list[_LayerWeights], torch.Tensor]:
    """(per-layer weights, LM head as (d, vocab)), cached per model and refreshed when weights change."""
    sources = [head.weight]
    for layer in inner.layers:
        a, m = layer.self_attn, layer.mlp
        sources += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        sources += [p for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
                    for p in (lin.weight, lin.bias) if p is not None]
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    cached = _FUSED.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    layers = []
    with torch.no_grad():
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            bias = None
            if a.q_proj.bias is not None:
                bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            layers.append(_LayerWeights(
                norm1=layer.input_layernorm.weight,
                qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).t().contiguous(),
                qkv_bias=bias, o=a.o_proj.weight.t().contiguous(), o_bias=a.o_proj.bias,
                norm2=layer.post_attention_layernorm.weight,
                gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]).t().contiguous(),
                down=m.down_proj.weight.t().contiguous(), eps=float(layer.input_layernorm.variance_epsilon)))
        value = (layers, head.weight.t().contiguous())
    _FUSED[model] = (key, value)
    return value


def clear_weight_cache(model: nn.Module | None = None) -> None:
    """Forget the fast path's weight copies (of ``model``, or of every model)."""
    if model is None:
        _FUSED.clear()
    else:
        _FUSED.pop(model, None)


class _FastDecoder:
    """Hand-written Llama-family decode step over the model's own weights, with a static KV cache.

    State: ``kv[l]`` of shape ``(b, 2*kv_heads, max_len, head_dim)`` (keys then values of layer l);
    ``key_ok`` ``(b, max_len)`` marks real (non-pad) key positions; ``length`` is how many cache columns
    are filled (the same for all rows thanks to left padding); ``positions`` ``(b,)`` each row's next
    position id. About 15 kernels per layer and step: one matmul for q/k/v, RoPE as x*cos + roll(x)*sin',
    addmm for projection + residual, one matmul for gate/up.
    """

    can_drop_rows = True

    def __init__(self, model: nn.Module, inner: nn.Module, head: nn.Module):
        self.model, self.inner, self.head = model, inner, head
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = float(inner.layers[0].self_attn.scaling)
        self.weights, self.head_t = _fused_weights(model, inner, head)
        self.embed = inner.embed_tokens.weight
        self.final_norm, self.final_eps = inner.norm.weight, float(inner.norm.variance_epsilon)

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_len: int) -> torch.Tensor:
        """Prefill. input_ids/attention_mask ``(b, t)`` left-padded; returns logits ``(b, vocab)``."""
        b, t = input_ids.shape
        device, dtype = input_ids.device, self.embed.dtype
        self.kv = [torch.empty(b, 2 * self.n_kv, max_len, self.head_dim, device=device, dtype=dtype)
                   for _ in self.weights]
        self.key_ok = torch.ones(b, max_len, dtype=torch.bool, device=device)
        self.key_ok[:, :t] = attention_mask.bool()
        self.padded = not bool(attention_mask.all())
        # cos/sin for every position this call can reach, from the model's own rotary module (so any
        # rope scaling of its config applies): (max_len, hd). rotate_half(x) = roll(x, hd/2) * [-1.., 1..],
        # so the sign goes into the sin table and RoPE costs a roll, a mul and an addcmul.
        probe = torch.zeros(1, 1, self.head_dim, device=device, dtype=dtype)
        cos, sin = self.inner.rotary_emb(probe, torch.arange(max_len, device=device)[None])
        half = self.head_dim // 2
        self.cos = cos[0].to(dtype)
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).to(dtype)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)          # (b, t)
        self.positions = positions[:, -1] + 1
        if self.padded:
            causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            mask = causal[None] & self.key_ok[:, None, :t]
            # a pad query row would attend to nothing (NaN); let it see itself, it is never read
            mask |= torch.eye(t, dtype=torch.bool, device=device)[None]
            mask = mask[:, None]                                                    # (b, 1, t, t)
        else:
            mask = None
        self.length = 0
        return self._forward(input_ids, positions, mask)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step. tokens ``(b,)``; returns logits ``(b, vocab)``."""
        positions = self.positions[:, None]
        self.positions = self.positions + 1
        mask = self.key_ok[:, None, None, : self.length + 1] if self.padded else None
        return self._forward(tokens[:, None], positions, mask)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished rows: keep only ``rows`` (1-D index tensor) of every per-row state."""
        n = self.length
        for i, buf in enumerate(self.kv):
            new = torch.empty((len(rows),) + tuple(buf.shape[1:]), device=buf.device, dtype=buf.dtype)
            new[:, :, :n] = buf[rows, :, :n]
            self.kv[i] = new
        self.key_ok = self.key_ok[rows]
        self.positions = self.positions[rows]
        self.padded = not bool(self.key_ok[:, :n].all())

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, q = ids.shape
        h, kv, hd = self.n_heads, self.n_kv, self.head_dim
        start, end = self.length, self.length + q
        hidden = F.embedding(ids, self.embed).view(b * q, -1)                       # (b*q, d)
        cos = self.cos[positions][:, None]                                          # (b, 1, q, hd)
        sin = self.sin[positions][:, None]
        causal = mask is None and q > 1
        gqa = kv != h
        for w, cache in zip(self.weights, self.kv):
            x = F.rms_norm(hidden, (hidden.shape[-1],), w.norm1, w.eps)
            qkv = torch.mm(x, w.qkv) if w.qkv_bias is None else torch.addmm(w.qkv_bias, x, w.qkv)
            qkv = qkv.view(b, q, h + 2 * kv, hd).transpose(1, 2)                   # (b, h+2kv, q, hd)
            qk = qkv[:, : h + kv]
            # RoPE (Su et al. 2021, arXiv:2104.09864) on queries and keys at once
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin)
            cache[:, :kv, start:end] = qk[:, h:]
            cache[:, kv:, start:end] = qkv[:, h + kv:]
            attn = F.scaled_dot_product_attention(qk[:, :h], cache[:, :kv, :end], cache[:, kv:, :end],
                                                  attn_mask=mask, is_causal=causal, scale=self.scale,
                                                  enable_gqa=gqa)                   # (b, h, q, hd)
            attn = attn.transpose(1, 2).reshape(b * q, h * hd)
            hidden = torch.addmm(hidden, attn, w.o)                               # residual + o_proj
            if w.o_bias is not None:
                hidden = hidden + w.o_bias
            x = F.rms_norm(hidden, (hidden.shape[-1],), w.norm2, w.eps)
            gate, up = torch.mm(x, w.gate_up).chunk(2, dim=-1)
            hidden = torch.addmm(hidden, F.silu(gate) * up, w.down)              # residual + SwiGLU down
        self.length = end
        last = hidden.view(b, q, -1)[:, -1]                                         # (b, d)
        last = F.rms_norm(last, (last.shape[-1],), self.final_norm, self.final_eps)
        return torch.mm(last, self.head_t)


class _HFDecoder:
    """Generic backend: the model's own forward with a transformers Cache (any causal LM).

    State: ``mask`` ``(b, max_len)`` 1 = real token (the 2-D padding mask the model turns into its
    attention mask), ``positions`` ``(b,)`` each row's next position id, ``cache`` the model's Cache.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.keep_kw: dict[str, Any] = {"logits_to_keep": 1}   # dropped for models that do not take it
        self.cache_kw = cache_keyword(model)

    def _call(self, **kwargs: Any) -> Any:
        try:
            return self.model(**kwargs, **self.keep_kw)
        except TypeError as exc:
            if "logits_to_keep" not in str(exc) or not self.keep_kw:
                raise
            self.keep_kw = {}
            return self.model(**kwargs)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_len: int) -> torch.Tensor:
        b, t = input_ids.shape
        self.mask = torch.ones(b, max_len, dtype=torch.long, device=input_ids.device)
        self.mask[:, :t] = attention_mask.long()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.positions = positions[:, -1] + 1
        self.length = t
        out = self._call(input_ids=input_ids, attention_mask=self.mask[:, :t], position_ids=positions,
                         use_cache=True)
        self.cache = returned_cache(out)
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.length += 1
        out = self._call(input_ids=tokens[:, None], attention_mask=self.mask[:, : self.length],
                         position_ids=self.positions[:, None], use_cache=True, **{self.cache_kw: self.cache})
        self.positions = self.positions + 1
        self.cache = returned_cache(out)
        return out.logits[:, -1]

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def can_drop_rows(self) -> bool:
        return hasattr(self.cache, "batch_select_indices")

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.positions = self.positions[rows]


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
        table = _byte_level_table(self.tokenizer) if cfg.stop_strings else None
        rows = [_RowText(self.tokenizer, table, cfg.stop_strings) for _ in prompts]
        result = None
        for result in self._run(prompts, cfg, rows, track_text=bool(cfg.stop_strings)):
            pass
        return result

    def stream(self, prompt_ids: Sequence[int], cfg: SamplingConfig | None = None) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces (whole characters, stop text removed)."""
        cfg = cfg or SamplingConfig()
        row = _RowText(self.tokenizer, _byte_level_table(self.tokenizer), cfg.stop_strings)
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

    def _decoder(self) -> Any:
        if self.fast is not False:
            found = _fast_path_layers(self.model)
            if found is not None:
                return _FastDecoder(self.model, *found)
            if self.fast:
                raise ChatsmithError("fast=True: this model is not a plain Llama-family model")
        return _HFDecoder(self.model)

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

    def _run(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, rows: list[_RowText],
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
                decoder = self._decoder()
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


# ----------------------------------------------------------------------------- CLI: chatsmith generate

@dataclass
class GenerateConfig:
    model: str = arg("", "Model directory (any local Hugging Face causal LM).")
    prompt: str = arg("", "Text to continue (raw: no chat template is applied).")
    max_new_tokens: int = arg(128, "Most tokens to generate.")
    temperature: float = arg(0.8, "Sampling temperature; 0 = greedy.")
    top_k: int = arg(0, "Sample among the k most likely tokens only (0 = off).")
    top_p: float = arg(1.0, "Nucleus sampling: smallest set of tokens holding this probability (1 = off).")
    repetition_penalty: float = arg(1.0, "Penalise tokens already present (1 = off, 1.1-1.3 typical).")
    seed: int | None = arg(None, "Random seed (same seed, same output).")
    stop: list[str] = arg([], "Stop when one of these strings is generated (it is not printed).")
    ignore_eos: bool = arg(False, "Keep going past the end-of-text token.")
    device: str = arg("auto", "cpu, cuda, mps or auto.")


def generate_cli(cfg: GenerateConfig) -> int:
    """`chatsmith generate MODEL --prompt TEXT`: stream the raw continuation to stdout."""
    from chatsmith.model import load_model

    if not cfg.model:
        raise ChatsmithError("generate: give a model directory (chatsmith generate MODEL --prompt TEXT)")
    if not cfg.prompt:
        raise ChatsmithError("--prompt: give the text to continue")
    loaded = load_model(cfg.model, device=cfg.device, require_template=False)
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(cfg.prompt, add_special_tokens=False)
    if not ids:
        raise ChatsmithError("--prompt: the prompt encodes to no tokens")
    stop_ids = [] if cfg.ignore_eos or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                              top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed,
                              stop_token_ids=tuple(stop_ids), stop_strings=tuple(cfg.stop), logprobs=False)
    out = sys.stdout
    for piece in stream(loaded.model, tokenizer, ids, sampling):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return 0

