"""Models and tokenizers: create one from a preset, load any Hugging Face causal LM, save atomically.

    from chatsmith.model import build_tokenizer, create_model, load_model, save_model
    tok = build_tokenizer(corpus_texts, vocab_size=4096, fmt="chatml")   # byte-level BPE + chat template
    model = create_model("tiny", tok)                                      # Llama: RoPE, RMSNorm, SwiGLU, SDPA
    save_model(model, tok, "runs/base")                                    # a standard HF directory
    loaded = load_model("runs/base")                                        # Loaded(model, tokenizer, fmt)

Any HF causal LM directory loads (`AutoModelForCausalLM` + `AutoTokenizer`), so does a peft LoRA adapter
directory (`adapter_config.json`; its base model with the adapter merged), the int8 output of `chatsmith
quantize` (`chatsmith.quantize.load_int8_model`, recognised by its marker), and a Hugging Face Hub id
(`owner/name`, not a local directory: handed to transformers, which reads its cache or downloads).
A model without a pad token gets `<|pad|>` added (embeddings resized); a tokenizer without a chat template needs
`template=` (`chatml`, `llama2`, `alpaca` or a `.jinja` file), which is set on the tokenizer so the saved
model carries it. Saved directories hold `config.json`, `model.safetensors` and tokenizer files with the
`chat_template`, so plain `transformers` loads them and `apply_chat_template` renders what chatsmith does.

Tests: `python -m pytest tests/test_model.py -q`.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
from torch import nn

from chatsmith.errors import ChatsmithError
from chatsmith.planted import plant_induction_head, plant_previous_token_head

PAD_TOKEN = "<|pad|>"
DOCUMENT_SEPARATOR = "<|endoftext|>"   # ends every pretraining document when the format has no eos

# Llama-architecture presets (Touvron et al. 2023): RoPE positions, RMSNorm, SwiGLU MLP, SDPA attention.
# `vocab_size` is the size of the BPE vocabulary to train; the model takes len(tokenizer).
# tiny: ~4.2 M parameters with a 4096 vocabulary (embeddings tied to the LM head), small enough that
# a few minutes of pretraining on 2 CPU cores give a usable base on the built-in world corpus.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=688, max_position_embeddings=512,
                 tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5),
    "small": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8, intermediate_size=1536, max_position_embeddings=1024,
                  tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5),
}


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' per-file progress bars while loading/saving tiny models (restored after)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_peft():
    """Hide peft's warnings that say nothing to a chatsmith user: it reads transformers' deprecated
    ``is_gradient_checkpointing``, and it cannot compare vocabularies with a base that is an adapter dir."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Could not find a config file", category=UserWarning)
        yield


class Loaded(NamedTuple):
    model: Any          # a transformers PreTrainedModel (causal LM), in eval mode
    tokenizer: Any      # PreTrainedTokenizerFast with a pad token
    fmt: Any            # chatsmith.chat.templates.ChatFormat, or None (no template and none required)


# ----------------------------------------------------------------------------- tokenizer

def _resolve_format(fmt: Any, tokenizer: Any = None) -> Any:
    from chatsmith.chat.templates import get_format

    return get_format(fmt, tokenizer) if not hasattr(fmt, "render_text") else fmt


def _format_special_tokens(fmt: Any) -> list[str]:
    from chatsmith.chat.templates import BUILTIN_SPECIAL_TOKENS

    tokens = list(BUILTIN_SPECIAL_TOKENS.get(getattr(fmt, "name", ""), []))
    for extra in (getattr(fmt, "bos_token", None), getattr(fmt, "eos_token", None)):
        if extra and extra not in tokens:
            tokens.append(extra)
    return tokens


def build_tokenizer(texts: Iterable[str], vocab_size: int, fmt: Any) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` with the chat format's special tokens.

    Byte-level (GPT-2 style, Radford et al. 2019) with ``add_prefix_space=False`` and no normaliser, so
    ``decode(encode(s)) == s`` for any unicode string. Special tokens: ``<|pad|>`` (id 0, distinct from
    the end-of-turn token), ``<|endoftext|>`` (document separator) and the format's own tokens.
    bos/eos are the format's (eos falls back to ``<|endoftext|>``); ``chat_template`` is the format's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fmt = _resolve_format(fmt)
    if vocab_size < 300:
        raise ChatsmithError(f"vocab_size: expected at least 300 (256 bytes + special tokens + merges), got {vocab_size}")
    specials = [PAD_TOKEN, DOCUMENT_SEPARATOR]
    specials += [t for t in _format_special_tokens(fmt) if t not in specials]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((t for t in texts if t), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        bos_token=fmt.bos_token or None,
        eos_token=fmt.eos_token or DOCUMENT_SEPARATOR,
        clean_up_tokenization_spaces=False,   # lossless: decode must not touch spaces
    )
    tokenizer.chat_template = fmt.template
    return tokenizer


# ----------------------------------------------------------------------------- create / load / save

INITS = ("standard", "prev-token", "induction")


def create_model(preset: str | dict[str, Any], tokenizer: Any, init: str = "standard") -> Any:
    """A randomly initialised LlamaForCausalLM sized by ``preset`` (a PRESETS name or a dict of
    LlamaConfig fields) with ``len(tokenizer)`` embeddings. Sets ``tokenizer.model_max_length``.
    ``init``: ``standard`` (transformers' initialisation), ``prev-token`` (the same, then
    `chatsmith.planted.plant_previous_token_head`) or ``induction`` (prev-token, then
    `chatsmith.planted.plant_induction_head`)."""
    if init not in INITS:
        raise ChatsmithError(f"init: unknown initialisation {init!r}; expected one of {', '.join(INITS)}")
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ChatsmithError(f"preset: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        fields = dict(PRESETS[preset])
    else:
        fields = dict(PRESETS["tiny"], **preset)
    fields["vocab_size"] = len(tokenizer)
    for name in ("pad", "bos", "eos"):
        fields[f"{name}_token_id"] = getattr(tokenizer, f"{name}_token_id", None)
    config = LlamaConfig(**fields)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    if init in ("prev-token", "induction"):
        plant_previous_token_head(model)
    if init == "induction":
        plant_induction_head(model)
    tokenizer.model_max_length = config.max_position_embeddings
    return model


def cache_keyword(model: nn.Module) -> str:
    """The keyword a causal LM's forward takes its KV cache under: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (older 5.x, which 5.24 still accepts with a deprecation warning). Wrappers whose
    forward only takes ``**kwargs`` (PEFT) are looked through to the model they wrap."""
    import inspect

    for _ in range(4):                       # a wrapper of a wrapper of ... the model
        try:
            params = inspect.signature(type(model).forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "cache" in params:
            return "cache"
        if "past_key_values" in params:
            return "past_key_values"
        unwrap = getattr(model, "get_base_model", None)
        inner = unwrap() if callable(unwrap) else getattr(model, "model", None)
        if inner is None or inner is model:
            break
        model = inner
    return "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a forward call returned (``output.cache`` or, before transformers 5.24,
    ``output.past_key_values``), or None when the model returned none (e.g. gradient checkpointing)."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None) if not isinstance(output, dict) else output.get(name)
        if value is not None:
            return value
    return None


def max_context_length(model: Any, tokenizer: Any = None) -> int:
    """The longest sequence (prompt + generation) the model takes, from its config or tokenizer."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if isinstance(value, int) and 0 < value < 10**8 else 2048


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ChatsmithError(f"dtype: expected one of {', '.join(names)} or auto, got {dtype!r}")
    return names[dtype]


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")   # "name" or "owner/name"


def model_source(path: str | Path) -> tuple[str, bool]:
    """``(what to pass to from_pretrained, is it a Hugging Face Hub id)`` for a model argument.

    An existing directory is local; so is anything that is not shaped like a Hub id (absolute or ``./``
    paths, more than one ``/``). A string shaped like ``owner/name`` that is not a directory here is a Hub
    id: transformers resolves it (its cache, or a download unless ``HF_HUB_OFFLINE=1``).
    """
    text = str(path)
    if Path(text).exists() or not HUB_ID.fullmatch(text) or ".." in text:
        return text, False
    return text, True


def hub_where(source: str) -> str:
    """How an error names a Hub id, so the user sees it was not taken for a local directory."""
    return f"{source}: not a local directory; as a Hugging Face Hub id"


def checked_model_source(path: str | Path, hint: str = "") -> tuple[str, bool]:
    """`model_source`, refusing a local path that is not a model directory: the one check every model
    argument (``--model``, ``--policy``, ``--reward-model``, ``--value-model``, eval's models, ...) goes
    through before transformers loads it. A Hub id passes unchecked (transformers reports what it cannot
    load). ``hint``: appended to the error, e.g. how to make such a directory."""
    source, hub = model_source(path)
    if not hub:
        local = Path(source)
        if not local.is_dir():
            raise ChatsmithError(f"{local}: model directory not found{hint}")
        from chatsmith.adapters import is_adapter_dir

        if not (local / "config.json").is_file() and not is_adapter_dir(local):
            raise ChatsmithError(f"{local}: not a model directory (no config.json or adapter_config.json){hint}")
    return source, hub


def model_config_dict(path: str | Path, hint: str = "") -> tuple[dict[str, Any], str, bool]:
    """``(config.json as a dict, source, is_hub)`` of a model argument, read without loading weights: from the
    local directory, or through transformers for a Hub id (its cache; its own error when offline)."""
    from transformers import PretrainedConfig

    from chatsmith.adapters import adapter_base, is_adapter_dir

    source, hub = checked_model_source(path, hint)
    if not hub and is_adapter_dir(source):   # an adapter's shape is its base model's
        return model_config_dict(adapter_base(source), hint)
    try:
        config, _ = PretrainedConfig.get_config_dict(source)
    except Exception as exc:  # noqa: BLE001 - many library error types; report them as one clear line
        where = hub_where(source) if hub else source
        raise ChatsmithError(f"{where}: cannot read config.json: {exc}{hint}") from None
    return config, source, hub


def has_chat_template(source: str, hub: bool) -> bool:
    """Whether the tokenizer of a model argument (see `checked_model_source`) carries a chat template, read
    without loading the model. For a Hub id that cannot be read: False (`load_model` reports the error)."""
    if hub:
        from transformers import AutoTokenizer

        try:
            return bool(getattr(AutoTokenizer.from_pretrained(source), "chat_template", None))
        except Exception:  # noqa: BLE001 - load_model reports it, naming the Hub id
            return False
    path = Path(source)
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
        except json.JSONDecodeError:
            return False
    return False


def load_model(path: str | Path, device: str = "auto", dtype: Any = None, template: str | None = None,
               require_template: bool = True) -> Loaded:
    """Load a HF causal LM: a local directory or a Hub id. Returns ``Loaded(model, tokenizer, fmt)`` (model
    in eval mode).

    - ``path``: a local model directory, a peft LoRA adapter directory (``adapter_config.json``: its base
      with the adapter merged, `load_adapter_model`), or a Hugging Face Hub id (``owner/name``) that is not a local
      directory, handed to transformers as is (see `model_source`); transformers' own error (offline,
      unknown repository) is shown if it cannot load it.
    - ``template`` (a built-in name, ``jinja``, or a ``.jinja`` path) overrides/sets the chat template;
      without one the tokenizer's own ``chat_template`` is used; if there is none either, a
      ChatsmithError asks for ``--template`` (unless ``require_template=False``: then ``fmt`` is None).
    - The format's special tokens (e.g. ``<|im_start|>``) are added to the vocabulary if missing, and a
      ``<|pad|>`` pad token if the tokenizer has none or its pad token is an end-of-turn token;
      embeddings are resized to match.
    - Attention runs through PyTorch SDPA wherever the architecture supports it: transformers picks
      ``attn_implementation="sdpa"`` by default then (tests/test_precision.py checks it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatsmith.adapters import is_adapter_dir, load_adapter_model

    source, hub = checked_model_source(path)
    if not hub and is_adapter_dir(source):
        return load_adapter_model(source, device=device, dtype=dtype, template=template,
                                  require_template=require_template)
    where = hub_where(source) if hub else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - many library error types; report them as one clear line
        raise ChatsmithError(f"{where}: cannot load the tokenizer: {exc}") from None
    from chatsmith.quantize import is_int8_dir, load_int8_model

    int8 = not hub and is_int8_dir(source)
    try:
        with quiet_transformers():
            if int8:      # `chatsmith quantize --int8` output: int8 layers, norms in the source's dtype
                model = load_int8_model(source)
                if _resolve_dtype(dtype) not in (None, "auto"):
                    model.to(_resolve_dtype(dtype))
            else:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=_resolve_dtype(dtype))
    except ChatsmithError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ChatsmithError(f"{where}: cannot load a causal language model: {exc}") from None
    return finish_loading(model, tokenizer, source, device, template, require_template, int8=int8)


def finish_loading(model: Any, tokenizer: Any, source: str, device: str, template: str | None,
                   require_template: bool, int8: bool = False) -> Loaded:
    """The chat format, its special tokens and a pad token (embeddings resized), then device and eval mode."""
    from chatsmith.utils import resolve_device

    fmt = None
    if template:
        fmt = _resolve_format(template, tokenizer)
        tokenizer.chat_template = fmt.template
    elif getattr(tokenizer, "chat_template", None):
        fmt = _resolve_format(None, tokenizer)
    elif require_template:
        raise ChatsmithError(f"{source}: the tokenizer has no chat_template; pass --template "
                             "chatml|llama2|alpaca|FILE.jinja to choose the chat format")

    added = False
    if fmt is not None:
        vocab = tokenizer.get_vocab()
        missing = [t for t in _format_special_tokens(fmt) if t not in vocab]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
            added = True
        if fmt.eos_token and tokenizer.eos_token is None:
            tokenizer.eos_token = fmt.eos_token
    stop_ids = set(fmt.stop_token_ids(tokenizer)) if fmt is not None else set()
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    if tokenizer.pad_token is None or tokenizer.pad_token_id in stop_ids:
        # padding with the end-of-turn token would teach (or mask) the wrong thing: use a token of its own
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added = True
    if int8 and (added or model.get_input_embeddings().weight.shape[0] < len(tokenizer)):
        raise ChatsmithError(f"{source}: an int8 model's vocabulary cannot grow, and this template needs new "
                             "tokens (its markers or a pad token); quantize the source model with --template")
    resize_to_tokenizer(model, tokenizer, force=added)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(resolve_device(device))
    model.eval()
    return Loaded(model, tokenizer, fmt)


def resize_to_tokenizer(model: Any, tokenizer: Any, force: bool = False) -> None:
    """Grow the embeddings to ``len(tokenizer)`` rows (or re-fit them when ``force``); new rows start at the
    mean of the old ones (`_init_new_rows_to_mean`)."""
    old_rows = model.get_input_embeddings().weight.shape[0]
    if force or old_rows < len(tokenizer):
        # new rows start at the mean of the old embeddings (Hewitt 2021), not at random
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        _init_new_rows_to_mean(model, old_rows)


def _init_new_rows_to_mean(model: Any, old_rows: int) -> None:
    """Set embedding (and untied output) rows added by a resize to the mean of the old rows.

    The mean keeps the new tokens' initial logits at the average (Hewitt 2021, "Initializing new word
    embeddings for pretrained language models"); transformers' default also adds noise drawn from the
    embeddings' covariance and prints a notice about it.
    """
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None}.values():
            weight = layer.weight
            if weight.shape[0] > old_rows > 0:
                weight[old_rows:] = weight[:old_rows].mean(dim=0, keepdim=True)


def save_model(model: Any, tokenizer: Any, out: str | Path, extra_files: dict[str, str] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``out`` atomically as a standard HF directory (config.json, model.safetensors, tokenizer
    files with the chat_template), plus ``extra_files`` (relative name -> text). ``state_dict``: the
    weights to write instead of the model's own (whole tensors gathered from an FSDP-sharded model)."""
    from chatsmith.utils import atomic_directory

    out = Path(out)
    model = getattr(model, "module", model)   # unwrap DistributedDataParallel
    from chatsmith.adapters import peft_model_of

    peft = peft_model_of(model)
    with atomic_directory(out) as tmp, quiet_transformers():
        if peft is not None:   # LoRA: a standard peft adapter directory (adapter_config.json + weights)
            with quiet_peft():
                peft.save_pretrained(str(tmp))
            if getattr(model, "generation_config", None) is not None:   # stop tokens set in training
                model.generation_config.save_pretrained(str(tmp))
            (tmp / "README.md").unlink(missing_ok=True)   # peft's empty model card template
        else:
            model.save_pretrained(str(tmp), state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    return out


def set_training(model: nn.Module, mode: bool) -> None:
    """`model.train(mode)`, skipped when every module is in that mode already: transformers' `train()`
    re-applies its hub-kernel mode and walks every module (about 1 ms for a small model), and an RL step
    switches between sampling (eval) and the update (train) several times."""
    if any(module.training != mode for module in model.modules()):
        model.train(mode)


def disable_dropout(model: Any) -> Any:
    """Dropout off in place, returned: dropout modules, attention dropout attributes, and the config's
    `*dropout*` / `*pdrop` fields. `model` is a module or a bare config (before a model is built).

    RL (PPO/GRPO) compares log-probabilities of the same tokens at sampling and at update time, and a
    reward must be a deterministic function of the text (Huang et al. 2024, "disable dropout").
    """
    config = model
    if isinstance(model, nn.Module):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            for name in ("attention_dropout", "dropout", "attn_dropout_p"):   # rates copied at construction
                if isinstance(getattr(module, name, None), float):
                    setattr(module, name, 0.0)
        config = getattr(model, "config", None)
    if config is not None:
        for name, value in list(vars(config).items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(config, name, 0.0)
    return model


EMBEDDING_MODES = ("seen", "special", "all", "none")
ROW_MASK_ATTRIBUTE = "_chatsmith_row_mask"   # the 0/1 row mask, kept on the embedding module (see below)
RL_EMBEDDING_MODES = ("special", "all", "none")     # RL stages have no fixed training text to take 'seen' from
TRAIN_EMBEDDINGS_HELP = ("Embedding rows to fine-tune: 'seen' (SFT, DPO: tokens that occur in the training data, "
                         "plus chat markers, pad and added tokens; every other token keeps its pretrained "
                         "embedding, so facts about entities absent from the fine-tuning data survive), "
                         "'special' (only the markers, pad and added tokens), 'all', or 'none'.")


def special_token_ids(tokenizer: Any, fmt: Any = None) -> list[int]:
    """Ids of the tokenizer's special and added tokens and of the chat format's markers, sorted."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(int(i) for i in (getattr(tokenizer, "get_added_vocab", dict)() or {}).values())
    if fmt is not None:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in _format_special_tokens(fmt) if t in vocab)
        ids.update(int(i) for i in fmt.stop_token_ids(tokenizer))
    return sorted(i for i in ids if i is not None and i >= 0)


def restrict_embedding_training(model: nn.Module, tokenizer: Any, fmt: Any, mode: str,
                                seen_ids: Iterable[int] | None = None) -> int:
    """Choose which embedding rows (input and, if untied, output) a fine-tuning stage may change.

    - ``all``: every row trains (as in pretraining).
    - ``seen`` (the SFT and DPO default): the rows of ``seen_ids`` (the tokens of the stage's training
      data) and of the special tokens (chat markers, pad, tokens added at load time) get gradients;
      every other row keeps what pretraining taught.
    - ``special`` (the PPO and GRPO default): only the special tokens' rows train.
    - ``none``: the embedding matrices are frozen.

    Why: a token that never occurs in the fine-tuning data still receives a small gradient at every
    position through the softmax normaliser (it is pushed down everywhere). Adam divides by the running
    RMS of that gradient, so the tiny but consistent push becomes a full learning-rate step per update and
    the row drifts far: measured on the built-in world, after 1,200 SFT steps the tiny model gave its
    held-out capitals a probability of 0.000 even after "The capital of Austria is" (0.98 in the base);
    with ``special`` it keeps 0.98 and answers 33 of 33 held-out capital questions. ``special`` alone
    goes too far for SFT: tokens that the replies need but pretraining rarely produced (" h" "ur" "t"
    spelling " hurt", absent from the corpus) cannot adapt, and the model misspells them ("htt");
    ``seen`` trains exactly the rows the data gives a direct signal to.
    Returns the number of trainable rows of the input embedding.
    """
    if mode not in EMBEDDING_MODES:
        raise ChatsmithError(f"train_embeddings: expected one of {', '.join(EMBEDDING_MODES)}, got {mode!r}")
    layers = {id(m): m for m in (model.get_input_embeddings(), getattr(model, "get_output_embeddings",
                                                                       lambda: None)()) if m is not None}
    rows = model.get_input_embeddings().weight.shape[0]
    if mode == "all":
        return rows
    if mode == "none":
        for layer in layers.values():
            layer.weight.requires_grad_(False)
        return 0
    keep_ids = set(special_token_ids(tokenizer, fmt))
    if mode == "seen":
        if seen_ids is None:
            raise ChatsmithError("train_embeddings 'seen' needs the token ids of the training data")
        keep_ids.update(int(i) for i in seen_ids)
    keep = sorted(i for i in keep_ids if 0 <= i < rows)
    hooked: set[int] = set()
    for layer in layers.values():
        weight = layer.weight
        if not weight.requires_grad:     # frozen already (LoRA): nothing to restrict
            continue
        mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        mask[keep] = 1.0
        # Zero gradient rows never move under Adam: both moments stay 0, so the update is 0 / (0 + eps).
        # A tied embedding/head is one tensor: one hook (a second would multiply by the same 0/1 mask again).
        if id(weight) not in hooked:
            hooked.add(id(weight))
            weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))
        # FSDP replaces the parameter (and its hook); the Trainer re-applies the mask from here.
        setattr(layer, ROW_MASK_ATTRIBUTE, mask)
    return len(keep)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
