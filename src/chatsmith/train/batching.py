"""Batches: a deterministic, resumable, rank-sharded stream of batches, and moving a batch to its device.

    source = ShardedBatchSource(items, batch_size=16, collate=my_collate, seed=0)
    batch = move_to_device(source.next_batch(), "cuda")
    state = source.state_dict()          # saved in the checkpoint; load_state_dict continues after it

Tests: `python -m pytest tests/test_train_loop.py -q`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from chatsmith.errors import ChatsmithError
from chatsmith.utils import rank as current_rank
from chatsmith.utils import world_size as current_world_size

__all__ = ["BatchSource", "ShardedBatchSource", "move_to_device"]


class BatchSource(Protocol):
    """What the Trainer needs from a data source."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShardedBatchSource:
    """An endless, deterministic, resumable, rank-sharded stream of batches over a fixed list of items.

    Epoch ``e`` visits the items in the order ``numpy.random.default_rng([seed, e]).permutation(n)`` (or in
    the given order with ``shuffle=False``). Under torchrun the order is padded by wrapping around to a
    multiple of the world size (as ``torch.utils.data.DistributedSampler`` does), and rank ``r`` takes
    positions ``r, r + W, r + 2W, ...``, so every rank has the same number of batches and the ranks' batches
    ``k`` together are positions ``k·b·W`` to ``(k+1)·b·W - 1`` whatever ``W`` (up to the wrap-around
    padding of the last batch of an epoch). The state is
    ``(epoch, batch index in the epoch)``: ``state_dict()`` after ``k`` batches and ``load_state_dict`` on a
    fresh source continue with batch ``k + 1`` exactly.
    """

    def __init__(self, items: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Any],
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None):
        if len(items) == 0:
            raise ChatsmithError("no training examples left after preprocessing (empty data?)")
        if batch_size < 1:
            raise ChatsmithError(f"--batch-size must be >= 1, got {batch_size}")
        self.items, self.batch_size, self.collate = items, int(batch_size), collate
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        self.rank = current_rank() if rank is None else int(rank)
        self.world_size = current_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ChatsmithError(f"rank {self.rank} is outside world size {self.world_size}")
        self.epoch, self.position = 0, 0
        self._order: list[int] | None = None
        if self.batches_per_epoch == 0:
            raise ChatsmithError(f"{len(items)} examples cannot fill one batch of {batch_size} per process "
                                 f"with drop_last (world size {self.world_size})")

    @property
    def shard_size(self) -> int:
        return math.ceil(len(self.items) / self.world_size)

    @property
    def batches_per_epoch(self) -> int:
        n = self.shard_size
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def shard_indices(self, epoch: int) -> list[int]:
        """Indices of the items this rank visits in ``epoch``, in order."""
        n = len(self.items)
        order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n))
        total = self.shard_size * self.world_size
        order = np.concatenate([order, order[: total - n]]) if total > n else order
        return order[self.rank::self.world_size].tolist()

    def next_indices(self) -> list[int]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.shard_indices(self.epoch)
        start = self.position * self.batch_size
        self.position += 1
        return self._order[start:start + self.batch_size]

    def next_batch(self) -> Any:
        return self.collate([self.items[i] for i in self.next_indices()])

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_items": len(self.items),
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved batch. The number of processes may change if the global batch (batch size
        x world size) does not: global batch ``k`` is always the slice ``k·B : (k+1)·B`` of the epoch's order."""
        for key, mine in (("n_items", len(self.items)), ("seed", self.seed)):
            if key in state and int(state[key]) != mine:
                raise ChatsmithError(f"cannot resume: the checkpoint's data has {key}={state[key]}, this run has "
                                     f"{mine} (resume with the same data and settings)")
        if "batch_size" in state:
            saved = int(state["batch_size"]) * int(state.get("world_size", 1))
            mine = self.batch_size * self.world_size
            if saved != mine:
                raise ChatsmithError(
                    f"cannot resume: the checkpoint's global batch is {saved} rows (--batch-size "
                    f"{state['batch_size']} x {state.get('world_size', 1)} processes), this run's is {mine} "
                    f"(--batch-size {self.batch_size} x {self.world_size}); keep batch size x processes the same")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def move_to_device(batch: Any, device: str | torch.device) -> Any:
    """Move tensors inside dicts, lists, tuples and dataclasses to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: move_to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch
