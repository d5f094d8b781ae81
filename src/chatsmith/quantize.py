"""Int8 models: `chatsmith quantize MODEL_DIR --int8 --out DIR`, and loading the result.

    chatsmith quantize runs/ppo --int8 --out runs/ppo-int8
    chatsmith chat runs/ppo-int8            # generate, chat, eval and serve load it like any model

Scheme (int8 weights): every linear layer (the LM head too) and the input embedding hold int8 weights with one fp32
scale per output row (symmetric, ``w ≈ q * scale``, ``q`` in [-127, 127]); norms and biases stay in the
source's dtype. The values come from torchao (``Int8WeightOnlyConfig`` with per-row granularity); the
layers that run them are chatsmith's own (`Int8Linear`, `Int8Embedding`), because on a CPU torchao's eager
int8 tensors are slower than fp32 (see `int8_matmul`): there FBGEMM's int8 matmul runs them, with the
activations quantized on the fly, which is what makes decoding faster (benchmarks/int8.py). Other
devices dequantize and use a float matmul.

On disk: ``config.json`` and the tokenizer files as usual, the weights in ``model-int8.safetensors`` (int8
tensors plus their ``weight_scale`` rows; a tied LM head is stored once, as the embedding) and the marker
``chatsmith-int8.json`` (which modules are int8, the source, library versions). Plain transformers finds no
weights it knows there and says so, instead of loading int8 values as floats. `chatsmith.model.load_model`
recognises the marker (`is_int8_dir`) and calls `load_int8_model`; training commands refuse such a model
(`chatsmith.train.outdir`).

Tests: `python -m pytest tests/test_quantize.py -q`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from chatsmith.config import arg, validate_config
from chatsmith.errors import ChatsmithError

__all__ = ["INT8_MARKER", "INT8_WEIGHTS", "Int8Matrix", "Int8Linear", "Int8Embedding", "int8_matmul",
           "quantize_weight", "quantize_model", "save_int8_model", "load_int8_model", "is_int8_dir",
           "int8_source", "QuantizeConfig", "quantize_cli", "directory_weight_bytes"]

INT8_MARKER = "chatsmith-int8.json"
INT8_WEIGHTS = "model-int8.safetensors"
FORMAT = "chatsmith-int8"
SCHEME = "int8 weight-only, symmetric, one scale per output row (torchao Int8WeightOnlyConfig, PerRow)"


# ----------------------------------------------------------------------------- int8 maths

class Int8Matrix(NamedTuple):
    """A weight held as ``qweight (out, in) int8`` and ``scale (out,)``: ``W ≈ qweight * scale[:, None]``."""

    qweight: torch.Tensor
    scale: torch.Tensor


def _fbgemm_ready() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _packed(w: Int8Matrix) -> Any:
    """FBGEMM's prepacked copy of ``w``, made once and kept on the int8 tensor (it lives and dies with it)."""
    packed = getattr(w.qweight, "fbgemm_packed", None)
    if packed is None:
        with warnings.catch_warnings():     # torch deprecates quantized tensors; the packed weight is what we need
            warnings.simplefilter("ignore")
            zero = torch.zeros(w.scale.shape[0], dtype=torch.long)
            qt = torch._make_per_channel_quantized_tensor(w.qweight, w.scale.double(), zero, 0)
            packed = torch.ops.quantized.linear_prepack(qt, None)
        w.qweight.fbgemm_packed = packed
    return packed


def int8_matmul(x: torch.Tensor, w: Int8Matrix) -> torch.Tensor:
    """``x @ W.T`` for x ``(rows, in)`` float → ``(rows, out)`` in x's dtype.

    CPU with FBGEMM (x86): the int8 weight prepacked once, activations quantized to 8 bits on the fly
    (one scale for the call's rows) and an int8 x int8 matmul; measured on a 2-core AVX2 EPYC, CPU time of
    greedy decoding a 110 M Llama, 1 thread: 1.44x fp32 at batch 1, 2.2x at batch 16. The weight-only kernel
    ``torch._weight_int8pack_mm`` (bf16 activations) gave 1.07x and 0.79x; torchao's own eager int8
    tensors cast the whole weight to float on every call (about 17x slower than fp32 per layer), and its
    dynamic one goes through ``torch._int_mm``, which is slower still on a CPU. Because activations share
    a scale across the rows of one call, a row's logits can differ slightly with what it is batched with.
    Other CPUs use ``_weight_int8pack_mm``; other devices dequantize and use a float matmul."""
    if x.device.type == "cpu":
        if _fbgemm_ready() and torch.backends.quantized.engine in ("x86", "fbgemm"):
            # reduce_range: 7-bit activations, so no int16 pair-sum saturates in AVX2 without VNNI
            return torch.ops.quantized.linear_dynamic(x.float().contiguous(), _packed(w), True).to(x.dtype)
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), w.qweight, w.scale.to(torch.bfloat16))
        return y.to(x.dtype)
    return F.linear(x, w.qweight.to(x.dtype)) * w.scale.to(x.dtype)


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight: buffers ``weight`` ``(out, in)`` int8 and ``weight_scale``
    ``(out,)`` fp32, optional ``bias`` ``(out,)``. Inference only (no parameters to train)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def matrix(self) -> Int8Matrix:
        return Int8Matrix(self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(..., in)`` → ``(..., out)``."""
        y = int8_matmul(x.reshape(-1, x.shape[-1]), self.matrix()).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """``nn.Embedding`` with int8 rows: ``weight`` ``(vocab, d)`` int8, ``weight_scale`` ``(vocab,)``.
    A lookup dequantizes only the rows asked for, into ``dtype`` (the model's float dtype)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids ``(...)`` → ``(..., d)`` in the scale's dtype."""
        return F.embedding(ids, self.weight).to(self.weight_scale.dtype) * self.weight_scale[ids, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


# ----------------------------------------------------------------------------- quantizing

def quantize_weight(weight: torch.Tensor) -> Int8Matrix:
    """torchao's int8 weight-only quantization of one ``(out, in)`` matrix, per output row."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerRow

    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
    quantize_(holder, Int8WeightOnlyConfig(granularity=PerRow()))
    q = holder.weight
    zero = getattr(q, "zero_point", None)
    if zero is not None and bool(zero.any()):    # the scheme is symmetric; a zero point would be ignored
        raise ChatsmithError("torchao returned an asymmetric int8 weight; this torchao version is not supported")
    return Int8Matrix(q.qdata.contiguous(), q.scale.reshape(-1).float().contiguous())


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _tied(model: nn.Module) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0)


def quantize_model(model: nn.Module) -> dict[str, Any]:
    """Replace, in place, every ``nn.Linear`` of ``model`` by an `Int8Linear` and its input embedding by an
    `Int8Embedding` (a tied LM head shares the embedding's int8 buffers). Returns the marker's layout part:
    ``{"linear": [names], "embedding": [name], "tied_lm_head": bool}``."""
    embed = model.get_input_embeddings()
    if type(embed) is not nn.Embedding:
        raise ChatsmithError(f"int8: the input embedding is a {type(embed).__name__}, not nn.Embedding; "
                             "this model cannot be quantized by chatsmith")
    tied = _tied(model)
    names = {id(m): n for n, m in model.named_modules()}
    embed_name, head_name = names[id(embed)], names.get(id(model.get_output_embeddings()))
    linear_names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    with torch.no_grad():
        m = quantize_weight(embed.weight)
        new_embed = Int8Embedding(embed.num_embeddings, embed.embedding_dim, embed.padding_idx)
        new_embed.weight, new_embed.weight_scale = m.qweight, m.scale
        for name in linear_names:
            lin = model.get_submodule(name)
            new = Int8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
            m = Int8Matrix(new_embed.weight, new_embed.weight_scale) if tied and name == head_name \
                else quantize_weight(lin.weight)
            new.weight, new.weight_scale = m.qweight, m.scale
            if lin.bias is not None:
                new.bias = lin.bias.detach().clone()
            _set_module(model, name, new)
        _set_module(model, embed_name, new_embed)
    model.config.tie_word_embeddings = tied
    return {"linear": linear_names, "embedding": [embed_name], "tied_lm_head": tied,
            "lm_head": head_name}


def save_int8_model(model: nn.Module, tokenizer: Any, out: str | Path, layout: dict[str, Any], source: str) -> Path:
    """Write ``out`` atomically: config, tokenizer, ``model-int8.safetensors`` and the marker."""
    from safetensors.torch import save_file

    import torchao

    from chatsmith.utils import atomic_directory

    out = Path(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout["tied_lm_head"]:     # stored once, as the embedding; safetensors refuses shared tensors anyway
        for suffix in ("weight", "weight_scale"):
            state.pop(f"{layout['lm_head']}.{suffix}", None)
    marker = {"format": FORMAT, "version": 1, "scheme": SCHEME, **layout, "source": source,
              "torch": torch.__version__, "torchao": torchao.__version__}
    with atomic_directory(out) as tmp:
        model.config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        save_file(state, str(tmp / INT8_WEIGHTS), metadata={"format": "pt", "chatsmith": FORMAT})
        (tmp / INT8_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- loading

def is_int8_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by `save_int8_model` (it holds the marker)."""
    return (Path(path) / INT8_MARKER).is_file()


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        marker = json.loads((path / INT8_MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ChatsmithError(f"{path / INT8_MARKER}: unreadable int8 marker ({exc})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or marker.get("version") != 1:
        raise ChatsmithError(f"{path / INT8_MARKER}: expected a {FORMAT} version 1 marker")
    return marker


def int8_source(path: str | Path) -> str:
    """The model directory an int8 directory was quantized from (as its marker records it)."""
    return str(_read_marker(Path(path)).get("source", "?"))


def load_int8_model(path: str | Path) -> nn.Module:
    """The causal LM of an int8 directory (CPU, eval mode): the architecture from ``config.json`` with its
    int8 layers in place and every tensor from ``model-int8.safetensors``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    marker = _read_marker(path)
    weights = path / INT8_WEIGHTS
    if not weights.is_file():
        raise ChatsmithError(f"{path}: int8 model directory without {INT8_WEIGHTS}")
    config = AutoConfig.from_pretrained(str(path))
    with no_init_weights():        # every tensor comes from the file: skip the random initialisation
        model = AutoModelForCausalLM.from_config(config)
    for name in marker["linear"]:
        lin = model.get_submodule(name)
        _set_module(model, name, Int8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None))
    for name in marker["embedding"]:
        emb = model.get_submodule(name)
        _set_module(model, name, Int8Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx))
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if marker["tied_lm_head"]:
        head, embed = model.get_submodule(marker["lm_head"]), model.get_submodule(marker["embedding"][0])
        head.weight, head.weight_scale = embed.weight, embed.weight_scale
        missing = [k for k in missing if not k.startswith(f"{marker['lm_head']}.weight")]
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:4])
        raise ChatsmithError(f"{weights}: does not match the model of {path}/config.json ({shown}); "
                             "quantize the source model again")
    return model.eval()


# ----------------------------------------------------------------------------- the command

@dataclass
class QuantizeConfig:
    model: str = arg("", "Model directory to quantize (a causal LM: chatsmith's output or any Hugging Face one).")
    int8: bool = arg(False, "Int8 weights (torchao, one scale per output row; on x86 CPUs run with 8-bit dynamic activations); the only scheme.")
    out: str = arg("", "Directory to write (must not exist yet).")
    template: str = arg("", "Chat template to store when the model has none: chatml, llama2, alpaca or FILE.jinja "
                            "(its tokens must be added before quantizing).")


def directory_weight_bytes(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``, ``*.pt``) directly in ``path``."""
    return sum(p.stat().st_size for p in Path(path).iterdir()
               if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt"))


def quantize_cli(cfg: QuantizeConfig) -> int:
    """`chatsmith quantize MODEL_DIR --int8 --out DIR`."""
    validate_config(cfg)
    from chatsmith.model import load_model
    from chatsmith.utils import note

    if not cfg.model:
        raise ChatsmithError("quantize: give a model directory (chatsmith quantize MODEL_DIR --int8 --out DIR)")
    if not cfg.int8:
        raise ChatsmithError("quantize: choose the scheme: --int8 (int8 weight-only, the only one so far)")
    if not cfg.out:
        raise ChatsmithError("--out: give the directory to write the int8 model to")
    out = Path(cfg.out)
    if out.exists():
        raise ChatsmithError(f"--out {out}: already exists; choose a new directory")
    if is_int8_dir(cfg.model):
        raise ChatsmithError(f"{cfg.model}: already an int8 model (quantized from {int8_source(cfg.model)})")
    loaded = load_model(cfg.model, device="cpu", template=cfg.template or None, require_template=False)
    layout = quantize_model(loaded.model)
    save_int8_model(loaded.model, loaded.tokenizer, out, layout, source=str(cfg.model))
    before, after = directory_weight_bytes(cfg.model), directory_weight_bytes(out)
    ratio = f", {after / before:.2f}x of {before / 1e6:.1f} MB" if before else ""
    note(f"wrote {out}: int8 weights {after / 1e6:.1f} MB{ratio} ({len(layout['linear'])} linear layers + the "
         f"embedding{', tied to the LM head' if layout['tied_lm_head'] else ''})")
    return 0
