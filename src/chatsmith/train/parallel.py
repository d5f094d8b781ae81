"""Several processes and big models: the collectives every stage uses under torchrun (`all_reduce_sum`,
`sum_over_ranks`, `all_reduce_gradients`), fully sharded data parallelism (FSDP2, `--parallel fsdp`) for the
supervised Trainer, and activation checkpointing (`--activation-checkpointing`) for every training command.

    torchrun --nproc-per-node 8 -m chatsmith sft --model runs/base --data chats.jsonl --parallel fsdp

DDP keeps a whole copy of the weights, gradients and AdamW moments on every rank; FSDP keeps 1/W of each
and all-gathers a decoder layer's weights just before it runs (and frees them after), so a model W times
larger fits. The gradients it produces are those DDP produces: each rank's gradient shard is the average
over ranks, so the Trainer's loss scaling is the same for both.

What sharding changes, and where this module handles it:

- ``shard_for_training``: one FSDP unit per decoder layer (the classes the HF model lists in
  ``_no_split_modules``), then the Trainer's ``LossModule`` as the root unit. The root owns what is left
  (embeddings, final norm, LM or score head) and is unsharded by its own forward, which runs the whole
  ``loss_fn``; losses that call ``model.base_model`` and the head separately stay correct.
- The model is sharded while still on the CPU and each rank's shard moves to the device, so no GPU holds
  the whole model. Parameters become ``DTensor`` shards, so the optimizer is built after sharding.
- ``full_state_dict`` / ``load_full_state_dict`` and ``full_optimizer_state`` / ``load_optimizer_state``
  turn shards into whole tensors and back, collectively. Checkpoints therefore hold plain, unsharded
  tensors in PyTorch's own optimizer layout: a checkpoint written with FSDP on 4 ranks resumes with DDP,
  FSDP on 2 ranks or one process, and the final model is a standard HF directory.
- ``--train-embeddings seen|special`` masks embedding-row gradients with a hook on the parameter.
  Sharding replaces that parameter, so ``mask_embedding_gradients`` applies the same row mask to the
  sharded gradient after backward.
- Evaluation calls the model outside the root's forward: ``unsharded_root`` gathers the root's weights
  for its duration (the decoder layers gather their own).

tests/test_distributed.py checks that SFT and the reward model train the same under FSDP on two CPU
ranks as in one process, and that checkpoints move between the two; benchmarks/fsdp_vs_ddp.py measures
the memory. Reference: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``); Zhao et al., "PyTorch FSDP:
Experiences on Scaling Fully Sharded Data Parallel" (VLDB 2023).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from chatsmith.errors import ChatsmithError
from chatsmith.model import ROW_MASK_ATTRIBUTE
from chatsmith.utils import process_group_ready

__all__ = ["all_reduce_sum", "sum_over_ranks", "all_reduce_gradients", "PARALLEL_MODES",
           "enable_activation_checkpointing", "shard_for_training", "is_sharded", "full_state_dict", "save_weights",
           "load_full_state_dict", "full_optimizer_state", "load_optimizer_state", "mask_embedding_gradients",
           "unsharded_root", "local_tensor", "local_piece"]

PARALLEL_MODES = ("ddp", "fsdp")
_LOCAL_MASK_ATTRIBUTE = "_chatsmith_row_mask_shard"   # this rank's rows of ROW_MASK_ATTRIBUTE's mask


# ----------------------------------------------------------------------------- collectives

def all_reduce_sum(values: list[float], device: Any) -> list[float]:
    """Each value summed over ranks (one float64 all-reduce); the values themselves in one process."""
    if not process_group_ready():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A tensor summed over ranks (a new tensor; the tensor itself in one process)."""
    if not process_group_ready():
        return t
    t = t.clone()
    torch.distributed.all_reduce(t)
    return t


def all_reduce_gradients(params: Iterable[nn.Parameter], average: bool) -> None:
    """Sum (or average) the parameters' gradients over ranks in place, with one all-reduce of a flat buffer.

    For the RL loops, which do their own accumulation instead of wrapping the model in DDP: `average` when
    each rank's loss is already a mean over an equal share of the batch (GRPO), a plain sum when each rank
    weighted its loss by its share of the global token count (PPO)."""
    if not process_group_ready():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:   # every rank must contribute a buffer of the same layout
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    if average:
        flat /= torch.distributed.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# ----------------------------------------------------------------------------- FSDP

def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # torch built without distributed
        return None
    return DTensor


def _is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_sharded(module: nn.Module) -> bool:
    """True when any parameter of ``module`` is a DTensor shard (FSDP2)."""
    return any(_is_dtensor(p) for p in module.parameters())


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ChatsmithError(f"--parallel fsdp: cannot find the decoder layers of {type(model).__name__} "
                             f"(it lists no _no_split_modules); use --parallel ddp")
    return layers


def shard_for_training(root: nn.Module, model: nn.Module, device: str,
                       compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply FSDP2 in place: each decoder layer of ``model`` is a unit, ``root`` (which contains ``model``
    and runs the loss) is the root unit. Returns ``root``, now an ``FSDPModule``.

    Give it the model still on the CPU: each rank's shard is then moved to ``device`` as it is cut, so no
    GPU ever holds the whole model.

    ``compute_dtype`` (bf16 under ``--dtype auto`` on GPU): the gathered weights are cast to it before the
    all-gather, halving its traffic and the unsharded weights' memory, while the sharded master weights,
    the optimizer and the gradient reduce-scatter stay fp32 (as in torchtitan's default policy)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
              if compute_dtype is not None else MixedPrecisionPolicy())
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    return root


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute decoder-layer activations during backward (transformers' own gradient checkpointing, in
    its non-reentrant form, which composes with DDP, FSDP and frozen inputs)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ChatsmithError(f"--activation-checkpointing: {type(model).__name__} does not support it")
    if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.24; the older name before
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _shard_like(value: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` (whole, the same on every rank) as a DTensor laid out like ``target``, in ``dtype`` (default:
    the target's). Every rank cuts its own piece (``src_data_rank=None``): no communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.device, dtype or target.dtype), target.device_mesh,
                             target.placements, src_data_rank=None)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every shard gathered into a whole tensor, on CPU (collective under FSDP:
    every rank must call it). Tied weights stay one tensor under each of their names, as in a plain model."""
    state = module.state_dict(keep_vars=True)      # the parameters themselves: tied names share one object
    if not any(_is_dtensor(t) for t in state.values()):
        return {name: t.detach() for name, t in state.items()}
    gathered: dict[int, torch.Tensor] = {}
    for t in state.values():
        if id(t) not in gathered:
            gathered[id(t)] = _full(t.detach()).cpu()
    return {name: gathered[id(t)] for name, t in state.items()}


def save_weights(state: dict[str, torch.Tensor], path: str) -> None:
    """Write a state dict as safetensors, each tied (storage-sharing) tensor once under its first name;
    ``load_full_state_dict`` and safetensors' ``load_model`` restore the other names from the tie."""
    from safetensors.torch import save_file

    seen: set[tuple] = set()
    unique = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        unique[name] = t.contiguous()
    save_file(unique, path, metadata={"format": "pt"})


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy whole tensors (the same on every rank) into a possibly sharded ``module``: each rank keeps its
    shard. A name missing from ``state`` is accepted when it is tied to one that is present (files store
    tied weights once)."""
    own = module.state_dict(keep_vars=True)          # persistent entries; tied names share one object
    tied: dict[int, list[str]] = {}
    for name, t in own.items():
        tied.setdefault(id(t), []).append(name)
    missing = sorted(n for names in tied.values() if not any(x in state for x in names) for n in names)
    unexpected = sorted(n for n in state if n not in own)
    if missing or unexpected:
        raise ChatsmithError(f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for names in tied.values():
            target, value = own[names[0]], state[next(n for n in names if n in state)]
            target.copy_(_shard_like(value, target) if _is_dtensor(target) else value.to(target.device, target.dtype))


def full_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """``optimizer.state_dict()`` with sharded moments gathered (collective under FSDP). The layout is
    PyTorch's own (parameters numbered in group order), so it loads into an unsharded optimizer too."""
    state = optimizer.state_dict()
    if not isinstance(optimizer, torch.optim.Optimizer) or not any(
            _is_dtensor(v) for s in state["state"].values() for v in s.values()):
        return state   # unsharded (or a composite such as PPO's policy + value pair, never sharded)
    return {**state, "state": {idx: {k: _full(v).detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                               for idx, s in state["state"].items()}}


def load_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    """Load a (whole-tensor) optimizer state; moments of sharded parameters are sharded like them."""
    params = [p for group in getattr(optimizer, "param_groups", ()) for p in group["params"]]
    if not any(_is_dtensor(p) for p in params):
        optimizer.load_state_dict(state)
        return
    sharded_state = {}
    for idx, s in state["state"].items():
        p = params[int(idx)]
        sharded_state[idx] = {
            k: (_shard_like(v, p, v.dtype)
                if _is_dtensor(p) and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v)
            for k, v in s.items()}
    optimizer.load_state_dict({**state, "state": sharded_state})


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This rank's piece of an FSDP-sharded parameter (its storage), or a plain parameter's data."""
    return param.to_local() if _is_dtensor(param) else param.data


def local_piece(param: torch.Tensor, whole: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(this rank's piece of param, the matching piece of whole)``: for an FSDP shard the local tensor and
    ``whole`` (a tensor of the parameter's full shape, the same on every rank) cut like it; otherwise the
    parameter itself and ``whole`` on its device and in its dtype."""
    if _is_dtensor(param):
        return local_tensor(param), _shard_like(whole, param).to_local()
    return local_tensor(param), whole.to(param.device, param.dtype)


def mask_embedding_gradients(model: nn.Module) -> None:
    """Zero the gradient rows that ``restrict_embedding_training`` froze, on sharded embedding weights (an
    unsharded weight's parameter hook has done it already). Each rank's piece of the mask is cut once."""
    done: set[int] = set()
    for module in model.modules():
        mask = getattr(module, ROW_MASK_ATTRIBUTE, None)
        grad = getattr(getattr(module, "weight", None), "grad", None)
        if mask is None or not _is_dtensor(grad) or id(grad) in done:
            continue
        done.add(id(grad))
        local = getattr(module, _LOCAL_MASK_ATTRIBUTE, None)
        if local is None:
            local = _shard_like(mask, grad).to_local()
            setattr(module, _LOCAL_MASK_ATTRIBUTE, local)
        grad.to_local().mul_(local)


@contextlib.contextmanager
def unsharded_root(engine: nn.Module) -> Iterator[None]:
    """Gather the FSDP root's own weights (embeddings, final norm, head) while the model is called outside
    the root's forward, e.g. by an evaluation function; a no-op for unsharded modules."""
    unshard = getattr(engine, "unshard", None)
    if unshard is None or not is_sharded(engine):
        yield
        return
    unshard()
    try:
        yield
    finally:
        engine.reshard()
