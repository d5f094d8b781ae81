"""How much memory a training run needs per device, estimated before anything is loaded: `--dry-run`.

    est = estimate_training_memory(params=494e6, trainable=494e6, hidden_size=896, num_layers=24,
                                   vocab_size=151936, batch_size=4, seq_len=1024, dtype="bf16")
    print(format_bytes(est.total))          # weights + gradients + AdamW states + activations

The estimate (`estimate_training_memory`, a pure function) adds, per device:

- weights: chatsmith keeps fp32 weights (4 bytes/param) and autocasts (`chatsmith.train.devices`); under
  bf16/fp16 autocast also keeps a 2-byte copy of each trainable weight for the step (its cast cache);
- gradients: fp32, 4 bytes per trainable param;
- AdamW: two fp32 moments, 8 bytes per trainable param.
  Together the usual 16 bytes per trainable parameter of mixed-precision Adam training (Rajbhandari et
  al. 2020, "ZeRO", section 3.1: 2 + 2 + 12 bytes; here 4 + 4 + 8, the same total);
- activations: per decoder layer ``34 * s * b * h`` bytes at 2-byte activations (Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", eq. 1 without the ``5 a s / h`` term
  of the attention scores, which SDPA's fused kernels never store), doubled for fp32; with activation
  checkpointing each layer keeps only its input ``s * b * h`` values, plus one layer's full activations
  during its recomputation; plus the logits ``b * s * V`` in the compute dtype and their fp32 log-softmax
  (an upper bound: SFT computes the head only at the positions it trains on).

Parallel modes: `ddp` holds a full replica per device; `fsdp` shards weights, gradients and optimizer
state over the world size (activations are per device either way). LoRA: pass its `trainable` count
(a full fine-tune trains every parameter); frozen parameters cost only their weights. Frozen models a
stage also holds (a DPO/PPO reference, a reward model) add `inference_memory`. The figures are estimates
of what PyTorch allocates (not the allocator's fragmentation, CUDA context or the KV cache of sampling).

`dry_run(command, cfg)` reads the models' configs (no weights), prints the table and returns; the CLI calls
it for `--dry-run` on every training command. Tests: `python -m pytest tests/test_memory.py -q`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatsmith.errors import ChatsmithError

__all__ = ["MemoryEstimate", "ModelShape", "estimate_training_memory", "inference_memory", "format_bytes",
           "model_shape", "dry_run_report", "dry_run"]

COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
WEIGHT_BYTES = 4          # chatsmith's weights stay fp32; autocast computes in the lower precision
GRAD_BYTES = 4
ADAM_BYTES = 8            # exp_avg and exp_avg_sq, fp32
ACTIVATION_FACTOR = 34    # bytes per (token x hidden) per layer at 2-byte activations (Korthikanti et al.)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by kind."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def estimate_training_memory(*, params: int, trainable: int, hidden_size: int, num_layers: int, vocab_size: int,
                             batch_size: int, seq_len: int, dtype: str = "fp32",
                             activation_checkpointing: bool = False, parallel: str = "ddp",
                             world_size: int = 1) -> MemoryEstimate:
    """Peak bytes per device of training one model with AdamW; see the module docstring for the formula.

    ``params``: all parameters; ``trainable``: those with gradients (all for a full fine-tune, the adapter's
    for LoRA); ``dtype``: the resolved compute dtype (fp32, bf16 or fp16); ``batch_size`` x ``seq_len``: the
    tokens of one micro-batch per device; ``parallel``: ddp (full replica) or fsdp (weights, gradients and
    optimizer state divided by ``world_size``).
    """
    if dtype not in COMPUTE_BYTES:
        raise ChatsmithError(f"--dtype: expected one of {', '.join(COMPUTE_BYTES)} here, got {dtype!r}")
    if not 0 <= trainable <= params:
        raise ChatsmithError(f"trainable parameters ({trainable}) must be between 0 and all parameters ({params})")
    compute = COMPUTE_BYTES[dtype]
    shard = world_size if parallel == "fsdp" else 1
    cast_cache = trainable * compute if compute < WEIGHT_BYTES else 0
    weights = (params * WEIGHT_BYTES + cast_cache) / shard
    gradients = trainable * GRAD_BYTES / shard
    optimizer = trainable * ADAM_BYTES / shard
    tokens = batch_size * seq_len
    per_layer = ACTIVATION_FACTOR * tokens * hidden_size * compute / 2
    if activation_checkpointing:
        layers = num_layers * tokens * hidden_size * compute + per_layer
    else:
        layers = num_layers * per_layer
    logits = tokens * vocab_size * (compute + 4)
    return MemoryEstimate(weights, gradients, optimizer, layers + logits if trainable else 0.0)


def inference_memory(*, params: int, parallel: str = "ddp", world_size: int = 1) -> MemoryEstimate:
    """A frozen model a stage holds beside the trained one (reference, reward model): its fp32 weights
    (sharded under fsdp); its no-grad activations are freed layer by layer and are left out."""
    shard = world_size if parallel == "fsdp" else 1
    return MemoryEstimate(params * WEIGHT_BYTES / shard, 0.0, 0.0, 0.0)


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``; binary units, as GPU memory is quoted."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# ----------------------------------------------------------------------------- the models of a command

@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of one model, read from its config on the meta device (no weights)."""

    role: str                # "policy", "reference", ...
    source: str              # directory, Hub id or preset
    params: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    trainable: bool          # trained in this stage (else frozen)
    trainable_params: int | None = None   # of a trained model, those with gradients (LoRA: the adapter's); None = all

    @property
    def n_trainable(self) -> int:
        if not self.trainable:
            return 0
        return self.params if self.trainable_params is None else self.trainable_params


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(role: str, source: Any, trainable: bool, *, classifier: bool = False) -> ModelShape:
    """Instantiate ``source`` (a model directory, Hub id, or a transformers config) on the meta device and
    count its parameters. ``classifier``: as a one-output sequence classifier (reward and value models)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from chatsmith.model import checked_model_source, hub_where

    if isinstance(source, str):
        name, hub = checked_model_source(source)
        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001 - many library error types; one clear line
            raise ChatsmithError(f"{hub_where(name) if hub else name}: cannot read the model's config: {exc}") from None
        label = name
    else:
        config, label = source, f"{getattr(source, 'model_type', 'model')} config"
    if classifier:
        config.num_labels = 1
    cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    text = _text_config(config)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or 0
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None) or 0
    return ModelShape(role, label, int(params), int(hidden), int(layers), int(getattr(text, "vocab_size", 0) or 0),
                      trainable)


def command_models(command: str, cfg: Any) -> list[ModelShape]:
    """The models a training command holds, trained or frozen, from its settings."""
    from chatsmith.train.rollout import reward_model_path

    if command == "pretrain":
        from transformers import LlamaConfig

        from chatsmith.model import PRESETS

        if cfg.preset not in PRESETS:
            raise ChatsmithError(f"--preset: unknown preset {cfg.preset!r}; expected one of {', '.join(PRESETS)}")
        fields = dict(PRESETS[cfg.preset])
        fields["vocab_size"] = cfg.vocab_size or fields["vocab_size"]
        return [model_shape("model", LlamaConfig(**fields), True)]
    if command == "sft":
        return [model_shape("model", cfg.model, True)]
    if command == "reward":
        return [model_shape("reward model", cfg.model, True, classifier=True)]
    if command == "dpo":
        return [model_shape("policy", cfg.model, True), model_shape("reference", cfg.model, False)]
    if command == "grpo":
        models = [model_shape("policy", cfg.model, True)]
        if cfg.beta != 0.0:
            models.append(model_shape("reference", cfg.model, False))
        rm = reward_model_path(cfg.reward)
        return models + ([model_shape("reward model", rm, False, classifier=True)] if rm else [])
    if command in ("ppo", "rlhf"):
        rm = cfg.policy if command == "rlhf" else reward_model_path(cfg.reward_model)
        value = getattr(cfg, "value_model", None) or rm or cfg.policy
        reference = getattr(cfg, "reference", None) or cfg.policy
        models = [model_shape("policy", cfg.policy, True), model_shape("value model", value, True, classifier=True),
                  model_shape("reference", reference, False)]
        return models + ([model_shape("reward model", rm, False, classifier=True)] if rm else [])
    raise ChatsmithError(f"--dry-run: not a training command: {command}")


def micro_batch(command: str, cfg: Any) -> tuple[int, int]:
    """(rows, tokens per row) of one training micro-batch per device."""
    if command == "rlhf":
        return 16, cfg.max_len           # PPO's default --batch-size; --ppo-config may change it
    return cfg.batch_size, cfg.max_len


def compute_dtype_name(requested: str, device: str) -> str:
    """fp32, bf16 or fp16: what ``--dtype`` means on ``device`` (``auto`` resolved as training would).
    An explicit fp16 is estimated even off CUDA (where training refuses it): the estimate is for planning."""
    from chatsmith.train.devices import resolve_dtype

    if requested in COMPUTE_BYTES:
        return requested
    return "fp32" if resolve_dtype(requested, device) is None else "bf16"


def dry_run_report(command: str, cfg: Any, models: list[ModelShape], world_size: int = 1) -> str:
    """The table `--dry-run` prints: each model's parameters and memory, then the total per device."""
    from chatsmith.utils import resolve_device

    device = resolve_device(getattr(cfg, "device", "auto"))
    requested = getattr(cfg, "dtype", "auto")
    dtype = compute_dtype_name(requested, device)
    batch, seq = micro_batch(command, cfg)
    checkpointing = bool(getattr(cfg, "activation_checkpointing", False))
    parallel = getattr(cfg, "parallel", "ddp")
    lines = [f"chatsmith {command} --dry-run: dtype {dtype} (--dtype {requested} on {device}), micro-batch "
             f"{batch} x {seq} tokens, activation checkpointing {'on' if checkpointing else 'off'}, "
             f"{parallel} over {world_size} device(s)"]
    total = 0.0
    for m in models:
        if m.trainable:
            est = estimate_training_memory(params=m.params, trainable=m.n_trainable, hidden_size=m.hidden_size,
                                           num_layers=m.num_layers, vocab_size=m.vocab_size, batch_size=batch,
                                           seq_len=seq, dtype=dtype, activation_checkpointing=checkpointing,
                                           parallel=parallel, world_size=world_size)
        else:
            est = inference_memory(params=m.params, parallel=parallel, world_size=world_size)
        total += est.total
        lines.append(f"  {m.role:<12} {m.source}: {m.params:,} parameters, {m.n_trainable:,} "
                     f"trainable; weights {format_bytes(est.weights)}, gradients {format_bytes(est.gradients)}, "
                     f"AdamW {format_bytes(est.optimizer)}, activations {format_bytes(est.activations)}")
    lines.append(f"estimated peak memory per device: {format_bytes(total)} (nothing trained, {cfg.out} not written)")
    return "\n".join(lines)


def dry_run(command: str, cfg: Any) -> int:
    """`--dry-run`: print the report for ``command``'s settings and return 0 without training."""
    from chatsmith.utils import world_size

    print(dry_run_report(command, cfg, command_models(command, cfg), world_size()))
    return 0
