"""Pack whole tokenized conversations into fixed-length rows without letting them see each other.

    from chatsmith.data.packing import pack_sequences, collate_packed
    bins = pack_sequences([len(ids) for ids, _ in seqs], max_len=512)        # best-fit decreasing
    batch = collate_packed([[seqs[i] for i in b] for b in bins[:8]], pad_id)
    logits = model(**batch.model_inputs(model.config._attn_implementation)).logits

A packed row holds several conversations back to back. `collate_packed` gives each row position ids
that restart at 0 per conversation and a block-diagonal causal boolean mask `(b, 1, t, t)` (True = may
attend), so the logits of every real token equal those of the conversation run alone, and the summed
assistant-token loss equals the unpacked one (tests/test_packing.py checks both to 1e-5 on a tiny
Llama, eager and sdpa). Labels follow the Hugging Face convention (aligned with `input_ids`; the loss
shifts them by one): -100 on padding, non-assistant tokens, and the first token of every conversation
(in a packed row it would otherwise be "predicted" from the previous conversation's last token).

What transformers 5.23 does with these inputs (read in `masking_utils.py` / `modeling_llama.py`, and
checked by tests/test_packing.py):
- A 4D `attention_mask` is used as given, for every attention implementation
  (`_preprocess_mask_arguments` returns a 4D mask unchanged; no causal mask is added on top).
- `sdpa` accepts the boolean mask (True = attend) and an additive float mask (0 / dtype min) alike.
- `eager` ADDS the mask to the attention scores (`attn_weights + attention_mask`): a boolean mask is
  silently added as +1.0/+0.0 and the result is wrong with no error. Eager needs the additive float
  mask; `PackedBatch.model_inputs()` converts for every implementation except sdpa.
- `position_ids` alone (no mask): transformers 5.23 can infer packed sequences from position-id
  restarts (`find_packed_sequence_indices`) and isolate them, but only when `attention_mask` is None
  AND there is no cache. `LlamaModel.forward` creates a DynamicCache whenever `use_cache` is true, and
  `config.use_cache` defaults to True, so `model(ids, position_ids=restarting)` attends across
  conversation boundaries in train() and eval() mode alike (max logit error 0.18 on a tiny model);
  with `use_cache=False` it isolates. Flash-attention (`flash_attention_2`) instead turns restarts
  into varlen `cu_seqlens`. We never rely on either: the explicit 4D mask works regardless of cache
  settings and version, and `model_inputs()` also passes `use_cache=False`.
- Padding positions attend only to themselves (never an all-False row): some SDPA kernels return NaN
  for a fully masked row, and 0 * NaN in the next layer's attention would leak into real tokens.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from chatsmith.errors import ChatsmithError

IGNORE_INDEX = -100
TokenSeq = tuple[Sequence[int], Sequence[int]]   # (input_ids, loss_mask) of one conversation


def pack_sequences(lengths: Sequence[int], max_len: int, seed: int | None = None) -> list[list[int]]:
    """Best-fit decreasing bin packing of sequence indices into bins of at most `max_len` tokens.

    The library's one packer: SFT rows (`train/sft.py`) and preference trees
    (`preference_functional.pack_trees`) are placed with it too.

    Deterministic: sequences are placed longest first (ties by index), each into the open bin with the
    least room that still fits it (Johnson 1973, BFD uses at most 11/9 OPT + 1 bins). Bins come out in
    creation order, i.e. roughly longest first; pass `seed` to shuffle the bin order reproducibly.
    """
    if max_len <= 0:
        raise ChatsmithError(f"max_len must be positive, got {max_len}")
    for i, n in enumerate(lengths):
        if n <= 0 or n > max_len:
            raise ChatsmithError(f"sequence {i} has {n} tokens; packing needs 1..max_len={max_len} "
                                 "(apply chatsmith.data.formats.fit_to_length first)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []   # sorted (room left, bin index) of bins that still have room
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))   # the tightest bin with room >= n
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
        else:
            b, room = len(bins), max_len
            bins.append([i])
        room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    if seed is not None:
        random.Random(seed).shuffle(bins)
    return bins


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], max_len: int) -> float:
    """Share of the `len(bins) * max_len` token slots holding real tokens."""
    return sum(lengths[i] for b in bins for i in b) / max(1, len(bins) * max_len)


def labels_from_mask(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[int]:
    """Token id where loss_mask is 1, -100 elsewhere; the first token is never a target."""
    if len(input_ids) != len(loss_mask):
        raise ValueError(f"input_ids ({len(input_ids)}) and loss_mask ({len(loss_mask)}) differ in length")
    labels = [tok if m else IGNORE_INDEX for tok, m in zip(input_ids, loss_mask)]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask (True = attend) -> additive float mask: 0 where allowed, the dtype's min elsewhere."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~mask, torch.finfo(dtype).min)


def _model_inputs(input_ids, position_ids, mask4d, attn_implementation: str, dtype) -> dict:
    if attn_implementation.startswith("flash_attention"):
        # varlen kernels isolate sequences from position-id restarts; a dense mask is not accepted there
        return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
    mask = mask4d if attn_implementation == "sdpa" else additive_mask(mask4d, dtype)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask, "use_cache": False}


@dataclass
class PackedBatch:
    """Packed rows. Shapes: `input_ids`, `labels`, `position_ids`, `seq_ids`: `(b, t)` long;
    `attention_mask`: `(b, 1, t, t)` bool, True = may attend (block-diagonal causal), or None."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    seq_ids: torch.Tensor
    attention_mask: torch.Tensor | None

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(x.to(device) if x is not None else None for x in
                             (self.input_ids, self.labels, self.position_ids, self.seq_ids, self.attention_mask)))

    @property
    def n_target_tokens(self) -> int:
        """Tokens that carry loss (labels != -100); after the shift in the loss this is the count too."""
        return int((self.labels != IGNORE_INDEX).sum())

    def model_inputs(self, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> dict:
        """Keyword arguments for a Hugging Face causal LM forward (see the module docstring):
        boolean mask for sdpa, additive float mask (in `dtype`, the model's dtype) for eager and others,
        no mask for flash-attention; always `use_cache=False`."""
        if self.attention_mask is None:
            raise ChatsmithError("this batch has no attention mask")
        return _model_inputs(self.input_ids, self.position_ids, self.attention_mask, attn_implementation, dtype)


def _row_width(lengths: Sequence[int], pad_to: int | None, what: str) -> int:
    """Columns of a right-padded batch: the longest row, or `pad_to` (which must fit every row)."""
    t = max(lengths, default=0)
    if pad_to is not None:
        if pad_to < t:
            raise ChatsmithError(f"{what} has {t} tokens, more than pad_to={pad_to}")
        t = pad_to
    return t


def collate_packed(rows: Sequence[Sequence[TokenSeq]], pad_id: int, pad_to: int | None = None) -> PackedBatch:
    """Build a PackedBatch from rows, each a list of (input_ids, loss_mask) conversations packed back to back.

    t = the longest row (or `pad_to`). Right padding with `pad_id`; padding has label -100, seq_id -1,
    position 0, and attends only to itself.
    """
    t = _row_width([sum(len(ids) for ids, _ in row) for row in rows], pad_to, "a packed row")
    b = len(rows)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    seq_ids = torch.full((b, t), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for s, (ids, mask) in enumerate(row):
            n = len(ids)
            input_ids[r, pos:pos + n] = torch.as_tensor(list(ids), dtype=torch.long)
            labels[r, pos:pos + n] = torch.as_tensor(labels_from_mask(ids, mask), dtype=torch.long)
            position_ids[r, pos:pos + n] = torch.arange(n)
            seq_ids[r, pos:pos + n] = s
            pos += n
    return PackedBatch(input_ids, labels, position_ids, seq_ids, block_causal_mask(seq_ids))


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """`(b, t)` sequence ids (-1 = pad) -> `(b, 1, t, t)` bool: query i may see key j iff j <= i and both
    belong to the same sequence; a pad position sees only itself."""
    t = seq_ids.shape[1]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=seq_ids.device))
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    real = (seq_ids >= 0)[:, :, None]
    eye = torch.eye(t, dtype=torch.bool, device=seq_ids.device)
    mask = (same & causal & real) | (eye & ~real)
    return mask[:, None, :, :]


@dataclass
class PaddedBatch:
    """One conversation per row, right padded. `input_ids`, `labels`, `attention_mask` (1 = real): `(b, t)`."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device) -> "PaddedBatch":
        return PaddedBatch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device))

    def model_inputs(self, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> dict:
        # A 2D padding mask: transformers builds the causal mask itself for every implementation.
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}


def collate_padded(sequences: Sequence[TokenSeq], pad_id: int, pad_to: int | None = None) -> PaddedBatch:
    """The unpacked baseline: one (input_ids, loss_mask) conversation per row, right padding."""
    t = _row_width([len(ids) for ids, _ in sequences], pad_to, "a sequence")
    b = len(sequences)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    for r, (ids, mask) in enumerate(sequences):
        n = len(ids)
        input_ids[r, :n] = torch.as_tensor(list(ids), dtype=torch.long)
        labels[r, :n] = torch.as_tensor(labels_from_mask(ids, mask), dtype=torch.long)
        attention_mask[r, :n] = 1
    return PaddedBatch(input_ids, labels, attention_mask)


def shifted_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target tokens and their count.

    `logits`: `(b, t, vocab)`; `labels`: `(b, t)` aligned with the inputs (-100 = no loss); position p
    predicts labels[p + 1]. Divide the sum by the count of the whole (accumulated) batch for the mean.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = logits[:, :-1][keep].float()   # only rows with a target: (n, vocab)
    loss_sum = torch.nn.functional.cross_entropy(picked, targets[keep], reduction="sum")
    return loss_sum, int(keep.sum())
