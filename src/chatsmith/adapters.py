"""LoRA adapter directories (peft): tell one apart, read its config, find its base model, merge it.

    is_adapter_dir("runs/my-sft")                 # adapter_config.json inside?
    loaded = load_adapter_model("runs/my-sft")    # the base with the adapter merged: one plain model

`chatsmith.model.load_model` hands an adapter directory here, so every command that takes a model directory
takes an adapter directory too. Training wraps models with `chatsmith.train.lora.apply_lora`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError
from chatsmith.model import (Loaded, finish_loading, load_model, model_source, quiet_peft, quiet_transformers,
                             resize_to_tokenizer)

ADAPTER_CONFIG = "adapter_config.json"
PEFT_ATTRIBUTE = "chatsmith_peft_model"   # where `chatsmith.train.lora.apply_lora` keeps the PeftModel


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a peft adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of an adapter directory as a dict (a clear error when unreadable)."""
    import json

    file = Path(path) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ChatsmithError(f"{file}: cannot read the adapter config ({exc})") from None
    if not isinstance(config, dict) or not config.get("base_model_name_or_path"):
        raise ChatsmithError(f"{file}: no base_model_name_or_path: chatsmith cannot tell which model the "
                             "adapter belongs to")
    return config


def adapter_base(path: str | Path, config: dict[str, Any] | None = None) -> str:
    """The base model of an adapter directory, from ``base_model_name_or_path``: an absolute directory as
    is; a relative one from the current directory, else from the adapter directory; otherwise a Hub id."""
    config = config if config is not None else read_adapter_config(path)
    base = str(config["base_model_name_or_path"])
    if Path(base).is_absolute() or Path(base).is_dir():
        if not Path(base).is_dir():
            raise ChatsmithError(f"{path}: the adapter's base model {base} (base_model_name_or_path in "
                                 f"{ADAPTER_CONFIG}) is not a directory; restore it or edit that field")
        return base
    beside = Path(path) / base
    if beside.is_dir():
        return str(beside)
    if model_source(base)[1]:
        return base
    raise ChatsmithError(f"{path}: the adapter's base model {base!r} (base_model_name_or_path in {ADAPTER_CONFIG}) "
                         f"is neither a directory here nor under {path}; restore it or edit that field")


def merge_adapter(model: Any, path: str | Path) -> Any:
    """``model`` (the base, embeddings already sized to the adapter's tokenizer) with the peft adapter in
    ``path`` loaded and merged into its weights: a plain transformers model."""
    from peft import PeftModel

    try:
        with quiet_transformers(), quiet_peft():
            wrapped = PeftModel.from_pretrained(model, str(path))
    except Exception as exc:  # noqa: BLE001 - peft raises many types for a mismatched adapter
        raise ChatsmithError(f"{path}: cannot load the adapter onto its base model "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    merged = wrapped.merge_and_unload()
    # peft loads an adapter for inference and freezes every weight on the way; the merged model is a plain
    # model like any other loaded one (a full fine-tune of it, e.g. PPO from a LoRA SFT model, trains it all)
    merged.requires_grad_(True)
    return merged


def load_adapter_model(path: str | Path, device: str = "auto", dtype: Any = None, template: str | None = None,
                       require_template: bool = True) -> Loaded:
    """A chat-model adapter directory (task CAUSAL_LM) as one plain model: its base (`adapter_base`, loaded by
    `load_model`, so a base that is itself an adapter works too) with the adapter merged, and the adapter
    directory's own tokenizer (it carries the chat template and any tokens added in training)."""
    from transformers import AutoTokenizer

    path = Path(path)
    config = read_adapter_config(path)
    if str(config.get("task_type") or "CAUSAL_LM") != "CAUSAL_LM":
        raise ChatsmithError(f"{path}: a reward-model adapter (task_type {config.get('task_type')}), not a chat "
                             "model; give it where a reward model is expected (--reward-model, score)")
    base = load_model(adapter_base(path, config), device="cpu", dtype=dtype, require_template=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ChatsmithError(f"{path}: cannot load the tokenizer: {exc}") from None
    model = base.model
    resize_to_tokenizer(model, tokenizer)
    model = merge_adapter(model, path)
    if (path / "generation_config.json").is_file():   # the adapter's own (its stop tokens), over the base's
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return finish_loading(model, tokenizer, str(path), device, template, require_template)


def peft_model_of(model: Any) -> Any:
    """The PeftModel wrapping ``model`` if `chatsmith.train.lora.apply_lora` gave it LoRA layers, else None."""
    model = getattr(model, "module", model)   # unwrap DistributedDataParallel
    return getattr(model, "__dict__", {}).get(PEFT_ATTRIBUTE)
