"""Planted circuits: initial weights that give a small Llama a previous-token head and induction heads from
the first step, and the list of weight slices a run may keep frozen.

    model = create_model("tiny", tokenizer, init="induction")    # chatsmith.model calls the planters
    frozen_weight_masks(model)     # [(name, parameter, 0/1 mask)] from config.json's chatsmith_frozen_weights

`chatsmith pretrain --init prev-token|induction` asks for them (the default is `standard`, transformers' own
initialisation); the demo does. The frozen slices stay fixed only in a run started with `--freeze-planted`
(`chatsmith.train.optim.keep_frozen_weights`). The model stays a standard LlamaForCausalLM either way.

Tests: `python -m pytest tests/test_model.py -q`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from chatsmith.errors import ChatsmithError

__all__ = ["plant_previous_token_head", "induction_code_dims", "plant_induction_head", "frozen_weight_masks",
           "FROZEN_WEIGHTS_KEY"]

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


FROZEN_WEIGHTS_KEY = "chatsmith_frozen_weights"   # config.json entry: weight slices --freeze-planted keeps
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

    So the circuit is planted and its wiring is listed in the config under ``chatsmith_frozen_weights``
    (a run with ``--freeze-planted`` keeps those slices as they are; the demo passes it to every stage):
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
    Three heads copying 192 dims gave the best memory of unseen names in the sweep of docs/EXPERIMENTS.md
    (2026-12-04): 0.84 against 0.00 with the previous-token head alone.

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
