"""Models and tokenizers: create one from a preset, load any Hugging Face causal LM, save atomically.

    from chatsmith.model import build_tokenizer, create_model, load_model, save_model
    tok = build_tokenizer(corpus_texts, vocab_size=4096, fmt="chatml")   # byte-level BPE + chat template
    model = create_model("tiny", tok)                                      # Llama: RoPE, RMSNorm, SwiGLU, SDPA
    save_model(model, tok, "runs/base")                                    # a standard HF directory
    loaded = load_model("runs/base")                                        # Loaded(model, tokenizer, fmt)

Any HF causal LM directory loads (`AutoModelForCausalLM` + `AutoTokenizer`), and so does a Hugging Face
Hub id (`owner/name`, not a local directory: handed to transformers, which reads its cache or downloads).
A model without a pad token gets `<|pad|>` added (embeddings resized); a tokenizer without a chat template needs
`template=` (`chatml`, `llama2`, `alpaca` or a `.jinja` file), which is set on the tokenizer so the saved
model carries it. Saved directories hold `config.json`, `model.safetensors` and tokenizer files with the
`chat_template`, so plain `transformers` loads them and `apply_chat_template` renders what chatsmith does.

Tests: `python -m pytest tests/test_model.py -q`.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
from torch import nn

from chatsmith.errors import ChatsmithError

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

INITS = ("induction", "prev-token", "standard")


def create_model(preset: str | dict[str, Any], tokenizer: Any, init: str = "standard") -> Any:
    """A randomly initialised LlamaForCausalLM sized by ``preset`` (a PRESETS name or a dict of
    LlamaConfig fields) with ``len(tokenizer)`` embeddings. Sets ``tokenizer.model_max_length``.
    ``init``: ``standard`` (transformers' initialisation), ``prev-token`` (the same, then
    `plant_previous_token_head`) or ``induction`` (prev-token, then `plant_induction_head`)."""
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


PREV_TOKEN_PAIRS = 4        # highest-frequency rotary pairs the planted head uses
PREV_TOKEN_MARGIN = 8.0     # its attention logit at the previous position over any other position


def plant_previous_token_head(model: Any) -> None:
    """Make head 0 of layer 0 attend to the previous token, from the first step of training.

    A previous-token head is the first half of the induction circuit (Olsson et al. 2022, "In-context
    Learning and Induction Heads") and a large part of what a small LM learns early: it tells each
    position which token came before it. From transformers' random init the tiny preset had not formed
    one after the full demo's 1,500 steps (no head gave the previous token more than 0.31 of its
    attention). Planted, it stays (0.96 on held-out text after 400 steps) and the world corpus's held-out
    loss is lower at equal steps: 1.35 against 1.70 after 400 steps, 0.99 against 1.14 after 1,500;
    standard init's 400-step loss is reached by step 250 (benchmarks/pretrain_init.py).

    How, on a Llama (RoPE, Su et al. 2021; RMSNorm; no biases):
    - Embedding dimension 0 is set to one constant ``kappa`` for every token, as large as the other
      dimensions together, so after RMSNorm it reads ``sqrt(hidden / 2)`` at every position. With tied
      embeddings it adds the same amount to every logit, which softmax ignores.
    - The head's query and key read only that dimension: q and k are the same at every position, so
      the attention logit depends on the distance alone. In rotary pair ``i`` (dims i and i + d/2,
      angle ``theta_i`` per position) the query is ``(a, 0)`` and the key ``a (cos theta_i, sin theta_i)``;
      RoPE turns their product at distance ``delta`` into ``a^2 cos(theta_i (delta - 1))``, largest at
      delta = 1. Summed over the ``PREV_TOKEN_PAIRS`` highest-frequency pairs (lower ones barely tell 1
      from 0 or 2), ``a`` is set so the logit at delta = 1 beats every other distance up to the context
      length by ``PREV_TOKEN_MARGIN``.
    - Values and outputs keep their random init: they carry the previous token onwards and training
      shapes them.
    The model stays a standard LlamaForCausalLM; this only sets initial weights. Assumes the rotate-half
    RoPE layout of transformers' Llama (pairs i, i + d/2) with ``rope_type`` default.
    """
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    if config.model_type != "llama" or rope.get("rope_type", "default") != "default":
        raise ChatsmithError(f"init prev-token: needs a Llama with default RoPE, got model_type "
                             f"{config.model_type!r}, rope {rope.get('rope_type')!r}")
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    half = head_dim // 2
    pairs = min(PREV_TOKEN_PAIRS, half)
    theta = float(rope.get("rope_theta", 10000.0)) ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    delta = torch.arange(config.max_position_embeddings, dtype=torch.float64)
    score = torch.cos(theta[None, :pairs] * (delta[:, None] - 1)).sum(1)     # (positions,), per a^2
    gap = float(score[1] - torch.cat([score[:1], score[2:]]).max())
    # logit = a^2 * score / sqrt(head_dim) (SDPA's scaling)
    amplitude = math.sqrt(PREV_TOKEN_MARGIN * math.sqrt(head_dim) / gap)
    query = torch.zeros(head_dim, dtype=torch.float64)
    key = torch.zeros(head_dim, dtype=torch.float64)
    query[:pairs] = amplitude
    key[:pairs] = amplitude * torch.cos(theta[:pairs])
    key[half:half + pairs] = amplitude * torch.sin(theta[:pairs])
    normed_constant = math.sqrt(hidden / 2)      # dimension 0 after RMSNorm (weight 1 at init)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, 0] = embed[:, 1:].float().pow(2).sum(1).mean().sqrt().to(embed.dtype)
        attention = model.model.layers[0].self_attn
        for proj, vector in ((attention.q_proj, query), (attention.k_proj, key)):
            proj.weight[:head_dim] = 0
            proj.weight[:head_dim, 0] = (vector / normed_constant).to(proj.weight.dtype)


FROZEN_WEIGHTS_KEY = "chatsmith_frozen_weights"   # config.json entry: weight slices every stage keeps as they are
INDUCTION_MATCH_LOGIT = 12.0   # attention logit of the planted induction head on a matching position, at init
INDUCTION_COPY_SCALE = 3.0     # its output (trainable) at init: copied code x this
INDUCTION_WRITE_SCALE = 0.14   # the previous token's code as written into the residual stream by layer 0
INDUCTION_HEADS = 3            # layer-1 heads planted as induction heads, each copying head_dim dims of its own


def induction_code_dims(config: Any) -> tuple[list[int], list[int], list[int]]:
    """The planted induction circuit's dimensions: ``(A, B, pairs)``.

    ``A``: residual dims 1..W, the token's own code (read by the query and copied by the values);
    ``B``: the last W residual dims, where layer 0 writes the previous token's code (read by the key);
    ``pairs``: the W/2 lowest-frequency rotary pairs of a head, whose angle over half the context stays
    under one radian, so that a match scores the same near and far.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    half = head_dim // 2
    rope = getattr(config, "rope_parameters", None) or {}
    base = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    reach = config.max_position_embeddings / 2
    pairs = [p for p in range(half) if base ** (-2 * p / head_dim) * reach <= 1.0]
    width = 2 * len(pairs)
    if not pairs or config.hidden_size < 1 + 2 * width:
        raise ChatsmithError(f"init induction: no room for the circuit (hidden {config.hidden_size}, head_dim "
                             f"{head_dim}, {len(pairs)} low-frequency rotary pairs); pass --init prev-token or "
                             "--init standard")
    hidden = config.hidden_size
    return list(range(1, 1 + width)), list(range(hidden - width, hidden)), pairs


def plant_induction_head(model: Any) -> None:
    """Give the model working induction heads (Olsson et al. 2022) from the first step, and keep them.

    An induction head predicts that ``... X Y ... X`` goes on with ``Y``: the attention at the second ``X``
    looks for a position whose *previous* token was ``X`` and copies the token there. It is what a chat
    model needs to say a name back ("My name is Tafe." ... "Your name is Tafe."), to repeat the country of
    the question in the answer, or the word of an ambiguous request. The tiny preset did not form one in the
    full demo's 3 M tokens (published fits put it near 23 M at this batch size), and a planted one that
    trained freely was gone within 400 steps: Adam moves every weight by about the learning rate per step,
    far more than the planted structure's scale, before the rest of the model learns to use it.

    So the circuit is planted and its wiring is frozen (listed in the config under
    ``chatsmith_frozen_weights``; every chatsmith training stage keeps those slices as they are):
    - Embedding dims ``B`` (`induction_code_dims`) are 0, and layer 0 writes nothing into dims ``B`` or
      the copy dims (1 .. INDUCTION_HEADS x head_dim) except this: head 0 of layer 0, the previous-token
      head of `plant_previous_token_head`, reads the token's code (dims ``A``, the first W copy dims) with
      its first W value rows and writes it into dims ``B``. After layer 0 a position's copy dims hold its
      own token's embedding and its dims ``B`` the code of the token before it.
    - Heads 0 .. INDUCTION_HEADS-1 of layer 1 match the query's ``A`` against the key's ``B`` in the
      low-frequency rotary pairs, scaled so that a match scores ``INDUCTION_MATCH_LOGIT`` at init (frozen).
    - Each one's values read head_dim copy dims of its own and its output writes them back: the copy. These
      start as a copy (x ``INDUCTION_COPY_SCALE``) and train, as everything else does, so the model learns
      how much to trust a match.
    Measured on the world corpus, quick's budget (170 pretraining steps, then 900 SFT steps), seed 0; the
    previous-token init alone gives held-out loss 2.25, SFT loss 1.02 and memory 0.00:

    | induction heads (copy dims kept clean) | held-out loss | SFT held-out loss | memory of unseen names |
    |---|---|---|---|
    | 1 (24, the code only) | 1.74 | 0.63 | 0.00 |
    | 1 (64) | 1.65 | 0.55 | 0.34 |
    | 2 (128) | 1.63 | 0.54 | 0.68 |
    | 3 (192), the default | 1.75 | 0.53 | 0.84 |
    | 3 (24: layer 0 may write into the other copy dims) | 2.22 | 0.79 | 0.02 |

    Grouped-query models (values shared between heads) get one induction head. The model stays a standard
    LlamaForCausalLM; the frozen slices are ordinary weights.
    """
    config = model.config
    if config.num_hidden_layers < 2:
        raise ChatsmithError(f"init induction: needs at least 2 decoder layers, the model has "
                             f"{config.num_hidden_layers}; pass --init prev-token or --init standard")
    code, prev, pairs = induction_code_dims(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.num_key_value_heads != config.num_attention_heads:
        n_heads = 1                # grouped heads share their values: one copy head
    else:
        n_heads = min(INDUCTION_HEADS, config.num_attention_heads)
    half = head_dim // 2
    width = len(code)
    qk_dims = pairs + [p + half for p in pairs]
    copies = [[d for d in range(1 + h * head_dim, 1 + (h + 1) * head_dim) if d < prev[0]] for h in range(n_heads)]
    copies = [c for c in copies if len(c) >= width]
    n_heads = len(copies)
    clean = sorted(set(code + prev + sum(copies, [])))
    rows = n_heads * head_dim
    layer0, layer1 = model.model.layers[0], model.model.layers[1]
    att0, att1 = layer0.self_attn, layer1.self_attn
    with torch.no_grad():
        model.get_input_embeddings().weight[:, prev] = 0
        att0.o_proj.weight[clean] = 0
        layer0.mlp.down_proj.weight[clean] = 0
        att0.v_proj.weight[:width] = 0
        att1.q_proj.weight[:rows] = 0
        att1.k_proj.weight[:rows] = 0
        att1.v_proj.weight[:rows] = 0
        att1.o_proj.weight[:, :rows] = 0
        for r in range(width):
            att0.v_proj.weight[r, code[r]] = 1.0
            att0.o_proj.weight[prev[r], r] = INDUCTION_WRITE_SCALE
        for h, copy in enumerate(copies):
            base = h * head_dim
            for r in range(width):
                att1.q_proj.weight[base + qk_dims[r], code[r]] = 1.0
                att1.k_proj.weight[base + qk_dims[r], prev[r]] = 1.0
            for r, d in enumerate(copy):
                att1.v_proj.weight[base + r, d] = 1.0
                att1.o_proj.weight[d, base + r] = INDUCTION_COPY_SCALE
        # scale the query so that a match scores INDUCTION_MATCH_LOGIT on a repeated random segment
        segment = torch.randint(10, config.vocab_size, (min(64, config.max_position_embeddings // 2),),
                                generator=torch.Generator().manual_seed(0))
        n = len(segment)
        captured: dict[str, torch.Tensor] = {}
        hook = layer1.input_layernorm.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
        was_training = model.training
        model.eval()                              # no dropout: the same scale whatever the RNG state
        try:
            model(torch.cat([segment, segment])[None].to(model.device))
        finally:
            hook.remove()
            model.train(was_training)
        x = captured["x"][0].float()
        q = x @ att1.q_proj.weight[:head_dim].float().T
        k = x @ att1.k_proj.weight[:head_dim].float().T
        later = torch.arange(n + 1, 2 * n)
        matched = (q[later] * k[later - n + 1]).sum(-1).mean() / math.sqrt(head_dim)
        att1.q_proj.weight[:rows] *= INDUCTION_MATCH_LOGIT / float(matched)
    everything = None
    setattr(config, FROZEN_WEIGHTS_KEY, [
        {"param": "model.embed_tokens.weight", "rows": everything, "cols": prev},
        {"param": "model.layers.0.self_attn.q_proj.weight", "rows": list(range(head_dim)), "cols": everything},
        {"param": "model.layers.0.self_attn.k_proj.weight", "rows": list(range(head_dim)), "cols": everything},
        {"param": "model.layers.0.self_attn.v_proj.weight", "rows": list(range(width)), "cols": everything},
        {"param": "model.layers.0.self_attn.o_proj.weight", "rows": clean, "cols": everything},
        {"param": "model.layers.0.self_attn.o_proj.weight", "rows": everything, "cols": list(range(width))},
        {"param": "model.layers.0.mlp.down_proj.weight", "rows": clean, "cols": everything},
        {"param": "model.layers.1.self_attn.q_proj.weight", "rows": list(range(rows)), "cols": everything},
        {"param": "model.layers.1.self_attn.k_proj.weight", "rows": list(range(rows)), "cols": everything},
    ])


def frozen_weight_masks(model: nn.Module) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """``(name, parameter, mask)`` for every parameter with slices the model's config says to keep frozen
    (``chatsmith_frozen_weights``, written by `plant_induction_head`); ``mask`` is a 0/1 tensor of the
    parameter's whole shape, on CPU. A config entry naming no parameter of this model (a head it lacks) is
    skipped; names match by suffix, so a wrapped model (PEFT, a value head) finds them too."""
    config = getattr(getattr(model, "module", model), "config", None)   # through DDP's .module
    specs = getattr(config, FROZEN_WEIGHTS_KEY, None) or []
    if not specs:
        return []
    params = {name: p for name, p in model.named_parameters()}
    out: dict[str, tuple[str, nn.Parameter, torch.Tensor]] = {}
    for spec in specs:
        name = next((n for n in params if n == spec["param"] or n.endswith("." + spec["param"])), None)
        if name is None:
            continue
        param = params[name]
        shape = tuple(param.shape)
        if name not in out:
            out[name] = (name, param, torch.zeros(shape))
        mask = out[name][2]
        rows = spec.get("rows")
        cols = spec.get("cols")
        rows = torch.as_tensor(rows, dtype=torch.long) if rows is not None else torch.arange(shape[0])
        if len(shape) == 1:
            mask[rows] = 1.0
        else:
            cols = torch.as_tensor(cols, dtype=torch.long) if cols is not None else torch.arange(shape[1])
            mask[rows[:, None], cols[None, :]] = 1.0
    return list(out.values())


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


def load_model(path: str | Path, device: str = "auto", dtype: Any = None, template: str | None = None,
               require_template: bool = True) -> Loaded:
    """Load a HF causal LM: a local directory or a Hub id. Returns ``Loaded(model, tokenizer, fmt)`` (model
    in eval mode).

    - ``path``: a local model directory, or a Hugging Face Hub id (``owner/name``) that is not a local
      directory, handed to transformers as is (see `model_source`); transformers' own error (offline,
      unknown repository) is shown if it cannot load it.
    - ``template`` (a built-in name, ``jinja``, or a ``.jinja`` path) overrides/sets the chat template;
      without one the tokenizer's own ``chat_template`` is used; if there is none either, a
      ChatsmithError asks for ``--template`` (unless ``require_template=False``: then ``fmt`` is None).
    - The format's special tokens (e.g. ``<|im_start|>``) are added to the vocabulary if missing, and a
      ``<|pad|>`` pad token if the tokenizer has none or its pad token is an end-of-turn token;
      embeddings are resized to match.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatsmith.utils import resolve_device

    source, hub = model_source(path)
    where = f"{source}: not a local directory; as a Hugging Face Hub id" if hub else source
    if not hub:
        path = Path(source)
        if not path.is_dir():
            raise ChatsmithError(f"{path}: model directory not found")
        if not (path / "config.json").is_file():
            raise ChatsmithError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - many library error types; report them as one clear line
        raise ChatsmithError(f"{where}: cannot load the tokenizer: {exc}") from None
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=_resolve_dtype(dtype))
    except Exception as exc:  # noqa: BLE001
        raise ChatsmithError(f"{where}: cannot load a causal language model: {exc}") from None

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
    old_rows = model.get_input_embeddings().weight.shape[0]
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
    if added or model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        # new rows start at the mean of the old embeddings (Hewitt 2021), not at random
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        _init_new_rows_to_mean(model, old_rows)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(resolve_device(device))
    model.eval()
    return Loaded(model, tokenizer, fmt)


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
    with atomic_directory(out) as tmp, quiet_transformers():
        model.save_pretrained(str(tmp), state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    return out


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
    for layer in layers.values():
        weight = layer.weight
        mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        mask[keep] = 1.0
        # Zero gradient rows never move under Adam: both moments stay 0, so the update is 0 / (0 + eps).
        weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))
        # FSDP replaces the parameter (and its hook); the Trainer re-applies the mask from here.
        setattr(layer, ROW_MASK_ATTRIBUTE, mask)
    return len(keep)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
