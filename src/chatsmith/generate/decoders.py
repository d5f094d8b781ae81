"""Next-token logits backends of the sampling engine, each with a KV cache.

- ``FastDecoder``: a hand-written decoder step for plain Llama-family models (Llama, Qwen2, Mistral:
  RoPE, RMSNorm, SwiGLU, optional q/k/v bias, GQA; float or `chatsmith quantize --int8` weights) with a
  static KV cache and the LM head on the last position only (``fast_path_layers`` says whether a model qualifies: not while a sliding attention
  window is shorter than the sequence, since the fast step attends to every earlier position).
- ``HFDecoder``: the model's own ``forward`` with ``past_key_values``; every other model.

Both expose ``start(input_ids, attention_mask, max_len) -> (b, vocab)`` logits of the last position,
``step(tokens (b,)) -> (b, vocab)``, ``keep(rows)`` (drop finished rows from the cache),
``batch_size`` and ``can_drop_rows``. They give the same tokens (tests/test_generate.py checks it).
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from chatsmith.model import cache_keyword, returned_cache
from chatsmith.quantize import Int8Embedding, Int8Linear, Int8Matrix, int8_matmul

__all__ = ["fast_path_layers", "sliding_window", "FastDecoder", "HFDecoder", "clear_weight_cache", "FAST_PATH_MAX_PARAMETERS"]


def sliding_window(config: Any) -> int | None:
    """The attention window of a model whose layers attend to the last ``window`` positions only (Mistral
    v0.1's 4096, Qwen2 with ``use_sliding_window``), else None. transformers applies it through the
    attention mask it builds from the config, not through an attribute of the attention modules."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def fast_path_layers(model: nn.Module, max_len: int | None = None) -> tuple[nn.Module, nn.Module] | None:
    """(inner model, lm_head) if ``model`` is a plain Llama-family model our fast step reproduces exactly
    for sequences of up to ``max_len`` tokens (None: any length). The fast step attends to every earlier
    position, so a sliding-window model qualifies only while its window cannot bind (max_len <= window)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in ("llama", "qwen2", "mistral"):
        return None
    window = sliding_window(config)
    if window is not None and (max_len is None or max_len > window):
        return None
    inner, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if inner is None or type(head) not in LINEAR_TYPES or head.bias is not None:
        return None
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return None
    if getattr(config, "mlp_bias", False):
        return None
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(inner, n) for n in needed) or type(inner.embed_tokens) not in (nn.Embedding, Int8Embedding):
        return None
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or getattr(attn, "sliding_window", None):
            return None
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return None
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
            getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(m) not in LINEAR_TYPES for m in linears):   # PEFT/LoRA, ... take the generic path
            return None
        if not hasattr(layer.input_layernorm, "variance_epsilon"):
            return None
    if sum(p.numel() for p in model.parameters()) > FAST_PATH_MAX_PARAMETERS:
        return None
    return inner, head


LINEAR_TYPES = (nn.Linear, Int8Linear)
Weight = Any    # a float (in, out) tensor, or an Int8Matrix (qweight (out, in) int8, scale (out,))


def _matmul(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x ``(rows, in)`` times a fused weight → ``(rows, out)``."""
    return torch.mm(x, w) if isinstance(w, torch.Tensor) else int8_matmul(x, w)


def _add_matmul(acc: torch.Tensor, x: torch.Tensor, w: Weight) -> torch.Tensor:
    """``acc + x @ w`` (one addmm for float weights); acc ``(rows, out)`` or ``(out,)``."""
    return torch.addmm(acc, x, w) if isinstance(w, torch.Tensor) else acc + int8_matmul(x, w)


def _fuse(linears: list[nn.Module]) -> Weight:
    """The weights of ``linears`` (same input) side by side: float ``(in, sum out)``, or int8 rows stacked."""
    if type(linears[0]) is Int8Linear:
        return Int8Matrix(torch.cat([m.weight for m in linears]).contiguous(),
                          torch.cat([m.weight_scale for m in linears]).contiguous())
    return torch.cat([m.weight for m in linears]).t().contiguous()


class _LayerWeights(NamedTuple):
    """One layer's weights laid out for ``x @ W`` with x ``(rows, in)``: every matrix is a contiguous
    ``(in, out)`` copy. On a CPU that is about 2x faster than ``F.linear``'s ``(out, in)`` layout for the
    one-row matmuls of decoding (measured: 150 vs 320 us for a 256x768 layer, cold cache, 1 thread)."""

    norm1: torch.Tensor         # (d,)
    qkv: Weight                 # (d, n_heads*hd + 2*n_kv*hd): q, k, v projections side by side
    qkv_bias: torch.Tensor | None
    o: Weight                   # (n_heads*hd, d)
    o_bias: torch.Tensor | None
    norm2: torch.Tensor
    gate_up: Weight             # (d, 2*ffn): gate and up projections side by side
    down: Weight                # (ffn, d)
    eps: float


# The fast path keeps a re-laid-out copy of the weights (see _LayerWeights), so it is used only for
# models up to this size; bigger ones take the generic path, where compute dominates anyway.
FAST_PATH_MAX_PARAMETERS = 600_000_000

# Copies per model, rebuilt when any source tensor changed (an optimizer step, `load_state_dict` or any
# in-place op bumps a parameter's version counter), so an RL policy is always sampled with its current
# weights. Writes through `param.data` bypass the counter: call clear_weight_cache(model) after those.
_FUSED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Any]]" = weakref.WeakKeyDictionary()


def _fused_weights(model: nn.Module, inner: nn.Module, head: nn.Module) -> tuple[list[_LayerWeights], Weight]:
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
                qkv=_fuse([a.q_proj, a.k_proj, a.v_proj]),
                qkv_bias=bias, o=_fuse([a.o_proj]), o_bias=a.o_proj.bias,
                norm2=layer.post_attention_layernorm.weight,
                gate_up=_fuse([m.gate_proj, m.up_proj]),
                down=_fuse([m.down_proj]), eps=float(layer.input_layernorm.variance_epsilon)))
        value = (layers, _fuse([head]))
    _FUSED[model] = (key, value)
    return value


def clear_weight_cache(model: nn.Module | None = None) -> None:
    """Forget the fast path's weight copies (of ``model``, or of every model)."""
    if model is None:
        _FUSED.clear()
    else:
        _FUSED.pop(model, None)


class FastDecoder:
    """Hand-written Llama-family decode step over the model's own weights, with a static KV cache.

    State: ``kv[l]`` of shape ``(b, 2*kv_heads, max_len, head_dim)`` (keys then values of layer l);
    ``key_ok`` ``(b, max_len)`` marks real (non-pad) key positions; ``length`` is how many cache columns
    are filled (the same for all rows thanks to left padding); ``positions`` ``(b,)`` each row's next
    position id. About 15 kernels per layer and step: one matmul for q/k/v, RoPE as x*cos + roll(x)*sin',
    addmm for projection + residual, one matmul for gate/up. A prefill of left-padded prompts of mixed
    lengths runs the matmuls over the real tokens only (their rows packed together) and only the attention
    over the padded layout.
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
        self.embed = inner.embed_tokens.weight             # float, or int8 rows (Int8Embedding)
        self.embed_layer, self.dtype = inner.embed_tokens, inner.norm.weight.dtype
        self.final_norm, self.final_eps = inner.norm.weight, float(inner.norm.variance_epsilon)

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def rope_tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``(length, hd)`` for positions 0..length-1, from the model's own rotary module (so any
        rope scaling of its config applies). rotate_half(x) = roll(x, hd/2) * [-1.., 1..], so the sign
        goes into the sin table and RoPE costs a roll, a mul and an addcmul."""
        probe = torch.zeros(1, 1, self.head_dim, device=device, dtype=self.dtype)
        cos, sin = self.inner.rotary_emb(probe, torch.arange(length, device=device)[None])
        half = self.head_dim // 2
        return cos[0].to(self.dtype), torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).to(self.dtype)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_len: int,
              tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Prefill. input_ids/attention_mask ``(b, t)`` left-padded; returns logits ``(b, vocab)``.
        ``tables``: `rope_tables` of at least ``max_len`` positions made earlier (else made here)."""
        b, t = input_ids.shape
        device, dtype = input_ids.device, self.dtype
        self.kv = [torch.empty(b, 2 * self.n_kv, max_len, self.head_dim, device=device, dtype=dtype)
                   for _ in self.weights]
        self.key_ok = torch.ones(b, max_len, dtype=torch.bool, device=device)
        self.key_ok[:, :t] = attention_mask.bool()
        self.padded = not bool(attention_mask.all())
        # cos/sin for every position this call can reach: (max_len, hd)
        ok = tables is not None and tables[0].shape[0] >= max_len and tables[0].device == device
        self.cos, self.sin = tables if ok else self.rope_tables(max_len, device)
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
        # A padded prefill runs its projections and MLPs over the real tokens only (packed), and its
        # attention over the padded layout: prompts of mixed lengths waste no matmul rows on padding.
        real = attention_mask.reshape(-1).nonzero().squeeze(1) if self.padded and t > 1 else None
        return self._forward(input_ids, positions, mask, real)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step. tokens ``(b,)``; returns logits ``(b, vocab)``."""
        positions = self.positions[:, None]
        self.positions = self.positions + 1
        mask = self.key_ok[:, None, None, : self.length + 1] if self.padded else None
        return self._forward(tokens[:, None], positions, mask)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished rows: keep only ``rows`` (1-D index tensor) of every per-row state.

        Rows in increasing order (finished rows leaving) move down inside the cache they are in: only
        the rows after the first gap are copied and no cache is allocated (a fresh one page-faults in
        and costs more than the copy). Any other ``rows`` (repeats: a prompt's cache row copied to the
        rows that share it) build a new cache.
        """
        n = self.length
        wanted = rows.tolist()
        first = _first_moved(wanted, self.batch_size)
        for i, buf in enumerate(self.kv):
            if first is None:
                new = torch.empty((len(wanted),) + tuple(buf.shape[1:]), device=buf.device, dtype=buf.dtype)
                new[:, :, :n] = buf[rows, :, :n]
            else:
                new = buf[: len(wanted)]
                if first < len(wanted):
                    new[first:, :, :n] = buf[rows[first:], :, :n]
            self.kv[i] = new
        self.key_ok = self.key_ok[rows]
        self.positions = self.positions[rows]
        self.padded = not bool(self.key_ok[:, :n].all())

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 real: torch.Tensor | None = None) -> torch.Tensor:
        """ids/positions ``(b, q)``; ``real``: the flat indices (into ``b * q``, increasing) of the non-pad
        tokens, or None: every position is computed. With ``real`` the hidden states are ``(len(real), d)``
        and only the attention sees the padded ``(b, q)`` layout (pad positions get zero keys and values,
        which the mask hides)."""
        b, q = ids.shape
        h, kv, hd = self.n_heads, self.n_kv, self.head_dim
        start, end = self.length, self.length + q
        flat_ids = ids.reshape(-1) if real is None else ids.reshape(-1)[real]
        hidden = self.embed_layer(flat_ids).to(self.dtype)                         # (b*q or n_real, d)
        cos = self.cos[positions][:, None]                                          # (b, 1, q, hd)
        sin = self.sin[positions][:, None]
        causal = mask is None and q > 1
        gqa = kv != h
        for w, cache in zip(self.weights, self.kv):
            x = F.rms_norm(hidden, (hidden.shape[-1],), w.norm1, w.eps)
            qkv = _matmul(x, w.qkv) if w.qkv_bias is None else _add_matmul(w.qkv_bias, x, w.qkv)
            if real is not None:
                qkv = qkv.new_zeros(b * q, qkv.shape[1]).index_copy_(0, real, qkv)
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
            if real is not None:
                attn = attn.index_select(0, real)
            hidden = _add_matmul(hidden, attn, w.o)                               # residual + o_proj
            if w.o_bias is not None:
                hidden = hidden + w.o_bias
            x = F.rms_norm(hidden, (hidden.shape[-1],), w.norm2, w.eps)
            gate, up = _matmul(x, w.gate_up).chunk(2, dim=-1)
            hidden = _add_matmul(hidden, F.silu(gate) * up, w.down)              # residual + SwiGLU down
        self.length = end
        if real is None:
            last = hidden.view(b, q, -1)[:, -1]                                     # (b, d)
        else:   # left padding: a row's last position is real, its packed index the running count - 1
            last = hidden[torch.bincount(real // q, minlength=b).cumsum(0) - 1]
        last = F.rms_norm(last, (last.shape[-1],), self.final_norm, self.final_eps)
        return _matmul(last, self.head_t)


def _first_moved(rows: list[int], size: int) -> int | None:
    """For ``rows`` strictly increasing within ``range(size)``: the first position whose row moves (row
    ``rows[i]`` goes to slot i), ``len(rows)`` if none does; None for any other ``rows``."""
    first = len(rows)
    previous = -1
    for i, row in enumerate(rows):
        if row <= previous or row >= size:
            return None
        if row != i and first == len(rows):
            first = i
        previous = row
    return first


class HFDecoder:
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
