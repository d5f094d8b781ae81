"""A KV-cached decode batch whose rows join and leave between steps (the core of continuous batching).

    batch = DecodeBatch(model)
    group, logits = batch.prefill([ids_a, ids_b])        # a new group's prompts, logits (2, vocab)
    group.keep(torch.tensor([1]))                         # row 0 finished on its first token
    batch.merge(group, room=[max_new_b - 1])              # row 1 joins the running rows
    logits = batch.step(last_tokens)                      # (rows, vocab): one token for every row
    batch.keep(torch.tensor([...]))                       # finished rows leave at once

`continuous.ContinuousBatch` drives it (sampling, stop checks) for both `chatsmith serve` and the RL
rollouts. It reuses the sampling engine's decoders (`chatsmith.generate.decoders`): the fast Llama-family step with
its static cache, or the model's own forward with a transformers ``DynamicCache`` for other models (and
for sliding-window models, whose window the fast step does not apply).
Rows are left-padded so every row's newest token sits in the same cache column; each row keeps its own
position ids and a key mask, so its attention never sees another row's padding. Merging two groups
left-pads the shorter one's cache to the longer one's length; when rows leave, cache columns that are
padding for every remaining row are cut. A row therefore computes exactly what it would alone (up to
float rounding of batched matmuls), which the tests check on greedy outputs. A prompt repeated within
a group (GRPO's G samples of one prompt, a request's n choices) is prefilled once and its cache row copied.

Run its tests with `python -m pytest tests/test_serve_batch.py tests/test_rollout_engine.py -q`.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch
from torch import nn

from chatsmith.generate.decoders import FastDecoder, HFDecoder, fast_path_layers
from chatsmith.generate.engine import distinct_rows

__all__ = ["DecodeBatch", "left_pad_cat", "sliding_window_layers"]


def left_pad_cat(a: torch.Tensor, len_a: int, b: torch.Tensor, len_b: int, dim: int, capacity: int,
                 fill: Any = 0, fill_future: bool = True) -> torch.Tensor:
    """Stack the rows of ``a`` and ``b`` (dim 0) with their first ``len_a`` / ``len_b`` columns (along
    ``dim``) right-aligned at column ``max(len_a, len_b)`` of a new tensor of ``capacity`` columns.

    a ``(na, ..., ca, ...)``, b ``(nb, ..., cb, ...)`` -> ``(na + nb, ..., capacity, ...)``; every column not
    copied holds ``fill``, except that with ``fill_future=False`` the columns from ``max(len_a, len_b)`` on
    are left uninitialised (a KV cache writes them before it reads them).
    """
    end = max(len_a, len_b)
    shape = list(a.shape)
    shape[0], shape[dim] = a.shape[0] + b.shape[0], capacity
    out = a.new_empty(shape)       # each column written once: a cache is tens of MB, filling it first doubles the cost
    na = a.shape[0]
    for part, start, rows, length in ((a, 0, na, len_a), (b, na, b.shape[0], len_b)):
        block = out.narrow(0, start, rows)
        block.narrow(dim, 0, end - length).fill_(fill)
        block.narrow(dim, end - length, length).copy_(part.narrow(dim, 0, length))
    if fill_future:
        out.narrow(dim, end, capacity - end).fill_(fill)
    return out


class DecodeBatch:
    """The running rows of one model: a decoder whose per-row state can be merged, cut and stepped.

    ``decoder`` is None while no row runs. ``can_merge`` is False for models whose transformers cache
    is not a plain per-layer key/value cache (sliding windows, quantised caches): those run one group at
    a time (a new group waits until the batch is empty).
    """

    def __init__(self, model: nn.Module, pad_id: int = 0):
        self.model = model
        self.pad_id = pad_id
        # the fast step attends to every earlier position: a model with sliding-window layers takes the
        # generic path, whose transformers cache applies the window
        self.fast = None if sliding_window_layers(getattr(model, "config", None)) else fast_path_layers(model)
        self.decoder: Any = None
        self.can_merge = True
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None   # RoPE cos/sin for every position

    # ------------------------------------------------------------------ queries

    @property
    def size(self) -> int:
        return 0 if self.decoder is None else self.decoder.batch_size

    # ------------------------------------------------------------------ operations

    def prefill(self, prompts: Sequence[Sequence[int]], room: int = 0) -> tuple[Any, torch.Tensor]:
        """Run a new group's prompts (left-padded together). Returns (group decoder, logits ``(n, vocab)``).

        ``room``: free cache columns to allocate past the prompts (a group that starts an empty batch
        then needs no copy to grow).
        """
        device = next(self.model.parameters()).device
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, longest - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        if self.fast is not None:
            decoder = FastDecoder(self.model, *self.fast)
            # the tables of the whole context serve the prompt too, unless the rope scaling depends on
            # the length asked for (then the prompt's own, as the batch engine does)
            tables = None if _length_dependent_rope(self.model.config) else self._rope_tables()
            start = lambda i, m: decoder.start(i, m, longest + room, tables)  # noqa: E731
        else:
            decoder = HFDecoder(self.model)
            start = lambda i, m: decoder.start(i, m, longest + room)  # noqa: E731
        first, inverse = distinct_rows(ids, mask) if len(prompts) > 1 else (None, None)
        if first is not None and len(first) < len(prompts):
            # each distinct prompt once, then its cache row copied to the rows that repeat it
            logits = start(ids[first], mask[first])
            if decoder.can_drop_rows:
                decoder.keep(inverse)
                logits = logits[inverse]
            else:
                logits = start(ids, mask)
        else:
            logits = start(ids, mask)
        if self.fast is None and not _plain_cache(decoder.cache):
            self.can_merge = False
        return decoder, logits

    def merge(self, group: Any, room: Sequence[int]) -> None:
        """Add ``group``'s rows (from :meth:`prefill`, possibly cut by ``group.keep``) to the running rows.

        ``room``: for every row after the merge (running rows first, then the group's), how many more
        tokens it may still be fed; the cache gets that many free columns past the longest row.
        """
        if group.batch_size == 0:
            return
        if self.decoder is None:
            self.decoder = group
            self._grow(max(room, default=0))
            return
        if not self.can_merge:
            raise RuntimeError("this model's cache cannot take new rows while others run")
        if self.fast is not None:
            self._merge_fast(group, max(room, default=0))
        else:
            self._merge_hf(group, max(room, default=0))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per running row: tokens ``(rows,)`` -> next-token logits ``(rows, vocab)``."""
        if self.decoder.length + 1 > self._capacity():
            self._grow(1)
        return self.decoder.step(tokens)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices into the running rows, in order); cut all-padding cache columns."""
        if self.decoder is None:
            return
        if len(rows) == 0:
            self.decoder = None
            return
        if len(rows) == self.size and list(rows) == list(range(self.size)):
            return
        index = torch.tensor(list(rows), dtype=torch.long, device=self.decoder.positions.device)
        self.decoder.keep(index)
        self._trim()

    # ------------------------------------------------------------------ fast decoder state
    # FastDecoder: kv[l] (b, 2*kv_heads, capacity, hd), key_ok (b, capacity) True = real or future key,
    # positions (b,), length = filled columns, padded = whether any filled column is padding.

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fast decoder's cos/sin tables for every position of the model's context, made once per
        model (a rollout a step builds a new batch; the tables do not change when the weights do)."""
        if self._tables is None:
            from chatsmith.model import max_context_length

            probe = FastDecoder(self.model, *self.fast)
            device = probe.embed.device
            cached = _ROPE_TABLES.get(self.model)
            if cached is not None and cached[0].device == device and cached[0].dtype == probe.dtype:
                self._tables = cached
            else:
                self._tables = probe.rope_tables(max_context_length(self.model) + 1, device)
                _ROPE_TABLES[self.model] = self._tables
        return self._tables

    def _merge_fast(self, group: FastDecoder, room: int) -> None:
        run = self.decoder
        end = max(run.length, group.length)
        capacity = end + room
        run.kv = [left_pad_cat(a, run.length, b, group.length, 2, capacity, fill_future=False)
                  for a, b in zip(run.kv, group.kv)]
        key_ok = left_pad_cat(run.key_ok, run.length, group.key_ok, group.length, 1, capacity, False)
        key_ok[:, end:] = True
        run.key_ok = key_ok
        run.positions = torch.cat([run.positions, group.positions])
        run.length = end
        run.padded = not bool(key_ok[:, :end].all())

    # ------------------------------------------------------------------ generic decoder state
    # HFDecoder: cache.layers[l].keys/values (b, kv_heads, length, hd), mask (b, capacity) 1 = real or
    # future token, positions (b,), length.

    def _merge_hf(self, group: HFDecoder, room: int) -> None:
        run = self.decoder
        end = max(run.length, group.length)
        for mine, theirs in zip(run.cache.layers, group.cache.layers):
            mine.keys = left_pad_cat(mine.keys, run.length, theirs.keys, group.length, 2, end)
            mine.values = left_pad_cat(mine.values, run.length, theirs.values, group.length, 2, end)
        mask = left_pad_cat(run.mask, run.length, group.mask, group.length, 1, end + room)
        mask[:, end:] = 1
        run.mask = mask
        run.positions = torch.cat([run.positions, group.positions])
        run.length = end

    # ------------------------------------------------------------------ shared

    def _capacity(self) -> int:
        dec = self.decoder
        return dec.kv[0].shape[2] if self.fast is not None else dec.mask.shape[1]

    def _grow(self, room: int) -> None:
        """Make room for ``room`` more columns past the filled ones (copying the cache if needed)."""
        dec = self.decoder
        need = dec.length + room
        if need <= self._capacity():
            if self.fast is not None:
                dec.cos, dec.sin = self._rope_tables()
            return
        if self.fast is not None:
            dec.cos, dec.sin = self._rope_tables()
            grown = []
            for buf in dec.kv:
                new = buf.new_empty(buf.shape[:2] + (need,) + buf.shape[3:])   # columns past length: written before read
                new[:, :, : dec.length] = buf[:, :, : dec.length]
                grown.append(new)
            dec.kv = grown
            key_ok = dec.key_ok.new_ones((dec.key_ok.shape[0], need))
            key_ok[:, : dec.length] = dec.key_ok[:, : dec.length]
            dec.key_ok = key_ok
        else:
            mask = dec.mask.new_ones((dec.mask.shape[0], need))
            mask[:, : dec.length] = dec.mask[:, : dec.length]
            dec.mask = mask

    def _trim(self) -> None:
        """Drop leading cache columns that are padding for every remaining row."""
        dec = self.decoder
        if not self.can_merge:       # a windowed cache keeps fewer columns than were fed: leave it as it is
            return
        real = (dec.key_ok if self.fast is not None else dec.mask.bool())[:, : dec.length].any(0)
        cut = int(real.long().argmax()) if bool(real.any()) else 0
        if cut == 0:
            return
        if self.fast is not None:
            dec.kv = [buf[:, :, cut:] for buf in dec.kv]
            dec.key_ok = dec.key_ok[:, cut:]
            dec.padded = not bool(dec.key_ok[:, : dec.length - cut].all())
        else:
            for layer in dec.cache.layers:
                layer.keys = layer.keys[:, :, cut:]
                layer.values = layer.values[:, :, cut:]
            dec.mask = dec.mask[:, cut:]
        dec.length -= cut


def sliding_window_layers(config: Any) -> bool:
    """Whether a model config has attention layers limited to a sliding window (Mistral with
    ``sliding_window``, Qwen2 with ``use_sliding_window``, configs whose ``layer_types`` say so)."""
    if config is None:
        return False
    types = getattr(config, "layer_types", None)
    if types:
        return any(t != "full_attention" for t in types)
    if getattr(config, "use_sliding_window", None) is False:
        return False
    return bool(getattr(config, "sliding_window", None))


# RoPE cos/sin tables per model (see DecodeBatch._rope_tables)
_ROPE_TABLES: "weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _length_dependent_rope(config: Any) -> bool:
    """Whether the model's RoPE tables depend on the sequence length they are made for (dynamic NTK,
    LongRoPE pick their frequencies from it)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type")) if isinstance(params, dict) else None
    return kind in ("dynamic", "longrope")


def _plain_cache(cache: Any) -> bool:
    """Whether a transformers cache is a list of plain growing key/value layers we can re-pad."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
