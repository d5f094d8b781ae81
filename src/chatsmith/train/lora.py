"""LoRA fine-tuning through peft (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    chatsmith sft --model runs/base --data sft.jsonl --lora-r 16 --out runs/sft-lora   # OUT: a peft adapter dir
    chatsmith chat runs/sft-lora                                   # any model argument takes an adapter dir
    chatsmith merge runs/sft-lora --out runs/sft-merged            # a plain transformers model directory

    model = apply_lora(model, cfg, base="runs/base")   # the same object, LoRA layers injected, base frozen
    total, trainable = parameter_counts(model)
    with adapter_disabled(model):                      # the frozen base: DPO/PPO/GRPO's reference
        ...

peft only wraps the model: chatsmith's losses, PPO and the run loop are unchanged and see a plain
transformers model whose linear layers carry adapters (`apply_lora` keeps the PeftModel beside it, for
saving and `disable_adapter()`). Only the adapters (and a reward model's score head, peft's
``modules_to_save``) train; the embeddings are frozen. Checkpoints hold those weights only
(`trainable_state` / `load_trainable_state`), the optimizer sees only them, and the final save is a standard
peft adapter directory: ``adapter_config.json`` (``task_type`` CAUSAL_LM for a chat model, SEQ_CLS for a
reward model; ``base_model_name_or_path`` the absolute base directory or Hub id), ``adapter_model.safetensors``
and the tokenizer files; `chatsmith.model.load_model` and `chatsmith.reward_model.load_reward_model` load it
as its base with the adapter merged.

Tests: `python -m pytest tests/test_lora.py -q`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatsmith.config import arg, validate_config
from chatsmith.errors import ChatsmithError
from chatsmith.model import model_source, quiet_peft
from chatsmith.adapters import PEFT_ATTRIBUTE, peft_model_of

__all__ = ["LORA_TARGETS_HELP", "lora_enabled", "check_lora_settings", "apply_lora", "adapter_disabled",
           "DisabledAdapterView", "AdapterDisabledScorer", "parameter_counts", "has_lora", "trainable_state",
           "load_trainable_state", "MergeConfig", "merge"]

LORA_R_HELP = ("LoRA rank r: train rank-r adapters on the --lora-targets layers (and a reward model's score head) "
               "with the base weights frozen; the output is a peft adapter directory. 0 = off (every weight trains).")
LORA_ALPHA_HELP = "LoRA alpha: the adapters' update is scaled by alpha / r (default 2 * r)."
LORA_DROPOUT_HELP = "Dropout on the LoRA adapters' input (PPO and GRPO turn all dropout off)."
LORA_TARGETS_HELP = ("Layers that get adapters: 'all-linear' (every linear layer of the transformer, not the output "
                     "head) or comma-separated module names (e.g. q_proj,v_proj).")
TARGET_NAME = re.compile(r"[A-Za-z_][\w.]*")


def lora_enabled(cfg: Any) -> bool:
    """Whether a config asks for LoRA (``lora_r`` > 0)."""
    return int(getattr(cfg, "lora_r", 0) or 0) > 0


def target_modules(spec: str) -> str | list[str]:
    """``--lora-targets`` as peft's ``target_modules``: ``"all-linear"`` or a list of module names."""
    spec = (spec or "").strip()
    if spec == "all-linear":
        return spec
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if not TARGET_NAME.fullmatch(n)]
    if not names or bad:
        raise ChatsmithError(f"--lora-targets: expected 'all-linear' or comma-separated module names such as "
                             f"q_proj,v_proj, got {spec!r}")
    return names


def check_lora_settings(cfg: Any) -> None:
    """The LoRA rules a config can be checked against before any model is loaded."""
    if not lora_enabled(cfg):
        return
    target_modules(cfg.lora_targets)
    if getattr(cfg, "parallel", "ddp") == "fsdp":
        raise ChatsmithError("--parallel fsdp: not with --lora-r (the adapters are small: use ddp)")


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what --lora-targets may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def apply_lora(model: nn.Module, cfg: Any, base: str | None = None, task: str = "causal") -> nn.Module:
    """Inject LoRA adapters into ``model`` (in place) as ``cfg`` asks; returns ``model`` itself.

    ``cfg``: anything with ``lora_r``, ``lora_alpha`` (None = 2 * r), ``lora_dropout``, ``lora_targets``.
    ``task``: ``causal`` (a chat model) or ``reward`` (a sequence-classification model: its ``score`` head
    trains in full beside the adapters, peft's ``modules_to_save``). ``base``: the base model's directory or
    Hub id, written to ``adapter_config.json`` (local directories as absolute paths). Every base weight is
    frozen; the PeftModel is kept on the model (`chatsmith.adapters.peft_model_of`).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if task not in ("causal", "reward"):
        raise ValueError(f"task: expected 'causal' or 'reward', got {task!r}")
    r = int(cfg.lora_r)
    if r < 1:
        raise ChatsmithError(f"--lora-r: expected an integer >= 1 to apply LoRA, got {r}")
    alpha = float(cfg.lora_alpha) if getattr(cfg, "lora_alpha", None) is not None else 2.0 * r
    targets = target_modules(cfg.lora_targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(cfg.lora_dropout), target_modules=targets,
                        bias="none", task_type=TaskType.SEQ_CLS if task == "reward" else TaskType.CAUSAL_LM,
                        modules_to_save=["score"] if task == "reward" else None)
    names = linear_names(model)
    try:
        with quiet_peft():
            wrapped = get_peft_model(model, config)
    except ValueError as exc:
        first = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).rstrip(". ")
        raise ChatsmithError(f"--lora-targets {cfg.lora_targets}: {first}; this model's linear layers are named "
                             f"{', '.join(names)}") from None
    if base is not None:
        source, hub = model_source(base)
        wrapped.peft_config["default"].base_model_name_or_path = source if hub else str(Path(source).resolve())
    inner = wrapped.base_model.model
    inner.__dict__[PEFT_ATTRIBUTE] = wrapped    # a plain attribute: not a submodule of the model it wraps
    return inner


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """Run ``model`` as its frozen base inside the block (peft's ``disable_adapter()``); a model without LoRA
    runs as it is."""
    peft = peft_model_of(model)
    if peft is None:
        yield model
        return
    with peft.disable_adapter():
        yield model


class DisabledAdapterView:
    """The base model under a LoRA policy, as a callable model: DPO's, PPO's and GRPO's frozen reference
    without a second copy of the weights. Calls run the policy with its adapters disabled and no gradient;
    attributes (``config``, ``parameters``...) are the policy's. Not a module: freezing or moving it would act
    on the policy, so the stages leave it alone."""

    def __init__(self, policy: nn.Module):
        self.policy = policy

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), adapter_disabled(self.policy):
            return self.policy(*args, **kwargs)

    __call__ = forward

    def get_base_model(self) -> nn.Module:
        return self.policy

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether the policy recomputes activations (then it returns no KV cache to share a prompt with)."""
        policy = self.policy
        name = ("is_activation_checkpointing" if hasattr(type(policy), "is_activation_checkpointing")
                else "is_gradient_checkpointing")
        return bool(getattr(policy, name, False))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["policy"], name)


class AdapterDisabledScorer:
    """A reward scorer whose reward model also carries the PPO value model's adapters: it scores with them
    disabled, i.e. with the reward model as trained. Other attributes are the scorer's."""

    def __init__(self, scorer: Any, model: nn.Module):
        self.scorer, self.model = scorer, model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with adapter_disabled(self.model):
            return self.scorer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["scorer"], name)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` parameters of ``model``, shared (tied) tensors counted once. With LoRA,
    ``total`` includes the adapters and ``trainable`` is the adapters (plus a reward model's head)."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad)


def has_lora(model: nn.Module) -> bool:
    """Whether any layer of ``model`` carries LoRA adapters."""
    return any(hasattr(m, "lora_A") for m in model.modules())


def trainable_state(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``weights`` (``model``'s state dict) that are trainable parameters: what a LoRA
    checkpoint must hold (the frozen base is the model the run started from)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: value for name, value in weights.items() if name in names}


def load_trainable_state(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy a `trainable_state` checkpoint into ``model``; its names must be the model's trainable ones."""
    own = dict(model.named_parameters())
    expected = {name for name, p in own.items() if p.requires_grad}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ChatsmithError(f"{source} does not match the LoRA model (same --lora-r and --lora-targets as the run "
                             f"that wrote it?): missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            own[name].copy_(value.to(own[name].device, own[name].dtype))


# ----------------------------------------------------------------------------- chatsmith merge

@dataclass
class MergeConfig:
    adapter: str = arg("runs/sft", "LoRA adapter directory (the --out of a training command run with --lora-r).")
    out: str = arg("runs/merged", "Where to write the merged model: a plain transformers model directory (a reward "
                   "model directory for a reward adapter).")
    overwrite: bool = arg(False, "Replace --out if it exists and is not empty.")


def merge(cfg: MergeConfig) -> Path:
    """`chatsmith merge`: the adapter's base with the adapter merged into its weights, saved as a plain model."""
    import json

    from chatsmith.model import load_model, save_model
    from chatsmith.adapters import is_adapter_dir, read_adapter_config
    from chatsmith.reward_model import FORMAT_KEY, NORM_FILE, NORM_MEAN_KEY, NORM_STD_KEY, load_reward_model
    from chatsmith.utils import note

    validate_config(cfg)
    adapter, out = Path(cfg.adapter), Path(cfg.out)
    if not is_adapter_dir(adapter):
        raise ChatsmithError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    if out.resolve() == adapter.resolve():
        raise ChatsmithError(f"--out {out}: must differ from the adapter directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise ChatsmithError(f"--out {out}: exists and is not empty; pass --overwrite to replace it")
    if read_adapter_config(adapter).get("task_type") == "SEQ_CLS":
        rm = load_reward_model(adapter, device="cpu", ensemble=False)
        setattr(rm.model.config, NORM_MEAN_KEY, rm.mean)
        setattr(rm.model.config, NORM_STD_KEY, rm.std)
        setattr(rm.model.config, FORMAT_KEY, getattr(rm.fmt, "name", None))
        norm = json.dumps({"mean": rm.mean, "std": rm.std}, indent=1) + "\n"
        save_model(rm.model, rm.tokenizer, out, extra_files={NORM_FILE: norm})
    else:
        loaded = load_model(adapter, device="cpu", require_template=False)
        save_model(loaded.model, loaded.tokenizer, out)
    note(f"merge: {adapter} merged into its base, saved to {out}")
    return out
