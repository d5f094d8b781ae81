"""Log-probs of sampled responses under a causal LM, for the RL forward passes (PPO, GRPO, `rollout`).

    logprobs, entropy = response_forward(model, input_ids, attention_mask, prompt_len, 0.8, with_entropy=True)

`response_forward` is the one entry point (`rollout.py` re-exports it). Plain Llama-family models
(`head_parts`: Llama, Qwen2, Qwen3, Mistral with a bias-free float32 head) without autocast take the fused
path, `fused_response_forward`; every other model its own forward (`model(...).logits`, log-softmax,
gather). What the fused path saves:

- `HeadLogprobs` runs the LM head, the log-softmax, the gather of the sampled tokens and the entropy on
  the `(n, vocab)` logits in one autograd node: it keeps the softmax (which its backward needs, instead of
  the log-softmax output, a gather's zero-filled gradient and the head's matmul inputs), and its backward
  writes `softmax - onehot` over it in place.
- The head's weight gradient is computed only for the rows that can train. The RL stages train only the
  special tokens' embedding rows by default (`model.restrict_embedding_training`, whose gradient hook zeroes
  every other row of the tied embedding/head), so the `(vocab, d)` weight-gradient matmul shrinks to those
  few rows; the gradient is the same (the other rows were zeroed anyway).
- With a shared prompt (GRPO's G responses), the prompt minus its last token runs once per distinct prompt
  with a KV cache, and the rest (the last prompt token, then the response) once per row, so every logit
  the loss needs comes out of one call: no logits of the prompt, no concatenation of logits.

The log-probs and gradients are the model forward's up to float rounding (a log-sum-exp instead of a
log-softmax, a matmul over fewer rows); tests/test_grpo.py compares the paths.
Tests: `python -m pytest tests/test_grpo.py tests/test_ppo.py -q`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from chatsmith.generate import distinct_rows
from chatsmith.model import ROW_MASK_ATTRIBUTE, cache_keyword, returned_cache
from chatsmith.train.preference_functional import position_ids_from_mask
from chatsmith.train.rl_functional import logprobs_and_entropy, logprobs_from_logits

__all__ = ["response_forward", "HeadLogprobs", "head_logprobs", "head_parts", "trainable_rows", "fused_response_forward"]

# Causal LMs whose logits are exactly `lm_head(backbone(...).last_hidden_state)` (no logit scale or softcap).
PLAIN_HEAD_TYPES = ("llama", "qwen2", "qwen3", "mistral")


class HeadLogprobs(torch.autograd.Function):
    """hidden `(n, d)` float32, head weight `(v, d)`, tokens `(n,)` -> log-probs `(n,)` of the tokens
    under `softmax(hidden @ weight.T / temperature)`, and that distribution's entropy `(n,)` (no grad).

    `rows`: the head rows whose weight gradient is wanted (a 1-D index tensor), None for all; the other
    rows of the weight gradient are 0. `with_grad`: keep the softmax for a backward, which may run once
    (it turns the saved softmax into the logits' gradient in place).
    """

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, rows, with_entropy, with_grad):
        logits = hidden @ weight.t()                                      # (n, v): what F.linear computes
        if temperature != 1.0:
            logits = logits / temperature
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        logprobs = logp.gather(-1, tokens[:, None]).squeeze(-1)
        entropy, probs = None, None
        if with_entropy or with_grad:
            probs = logp.exp()                                             # what the backward needs
            if with_entropy:   # -sum_v p_v log p_v, one dot product per row (no (n, v) temporary)
                entropy = -torch.linalg.vecdot(probs, logp)
        ctx.temperature = temperature
        ctx.save_for_backward(hidden, weight, tokens, probs, rows)
        if entropy is None:
            entropy = logprobs.new_zeros(0)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, tokens, probs, rows = ctx.saved_tensors
        # d logp_tok / d z = onehot(tok) - softmax(z): the gradient of the logits, written over the softmax
        grad = probs.mul_(-grad_logprobs[:, None])
        grad.scatter_add_(-1, tokens[:, None], grad_logprobs[:, None])
        if ctx.temperature != 1.0:
            grad = grad.div_(ctx.temperature)
        grad_hidden = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            if rows is None:
                grad_weight = grad.t() @ hidden
            else:
                grad_weight = torch.zeros_like(weight)
                grad_weight[rows] = grad[:, rows].t() @ hidden
        return grad_hidden, grad_weight, None, None, None, None, None


def head_logprobs(hidden: torch.Tensor, head: nn.Linear, tokens: torch.Tensor, temperature: float = 1.0,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `(b, r)` of tokens `(b, r)` from hidden states `(b, r, d)` through the LM head `head`
    at `temperature`, and the entropy `(b, r)` if asked (no grad); float32. The head's weight gradient
    covers only `trainable_rows(head)`."""
    b, r, d = hidden.shape
    weight = head.weight
    rows = trainable_rows(head) if weight.requires_grad else None
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logprobs, entropy = HeadLogprobs.apply(hidden.reshape(b * r, d), weight, tokens.reshape(-1),
                                           float(temperature), rows, with_entropy, with_grad)
    return logprobs.view(b, r), (entropy.view(b, r) if with_entropy else None)


def trainable_rows(head: nn.Module) -> torch.Tensor | None:
    """The rows of the head's weight that get a gradient: those of the row mask
    `restrict_embedding_training` put on it, or None (every row)."""
    mask = getattr(head, ROW_MASK_ATTRIBUTE, None)
    if mask is None:
        return None
    rows = mask.view(-1).nonzero().view(-1)
    return rows.to(head.weight.device) if rows.numel() < mask.numel() else None


def head_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """`(backbone, lm_head)` of a causal LM whose logits are `lm_head(backbone(...).last_hidden_state)`
    with a bias-free float32 head (Llama, Qwen2, Qwen3, Mistral), else None (wrappers such as PEFT or the
    LoRA reference view, other architectures: the model's own forward is used). Only a module qualifies:
    `lora.DisabledAdapterView` passes attribute lookups through to the policy, whose backbone called
    directly would run with the adapters on."""
    if not isinstance(model, nn.Module):
        return None
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    prefix = getattr(model, "base_model_prefix", "")
    backbone, head = getattr(model, prefix, None) if prefix else None, getattr(model, "lm_head", None)
    if backbone is None or type(head) is not nn.Linear or head.bias is not None:
        return None
    if head.weight.dtype != torch.float32 or not hasattr(backbone, "layers"):
        return None
    return backbone, head


def fused_response_forward(model: nn.Module, parts: tuple[nn.Module, nn.Linear], input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, prompt_len: int, temperature: float = 1.0,
                           with_entropy: bool = False, share_prompt: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`rollout.response_forward` through `head_parts`: log-probs `(b, r)` (and entropy) of the response
    tokens of input_ids / attention_mask `(b, p + r)` laid out as `rollout.pad_rollout` makes them.

    The hidden state at position p - 1 + t scores response token t, so the backbone runs on positions
    `[0, p + r - 1)` only (the last response token scores nothing). `share_prompt`: when rows repeat a
    prompt, positions `[0, p - 1)` of each distinct prompt run once with a KV cache, copied to its rows,
    and positions `[p - 1, p + r - 1)` of every row against it.
    """
    backbone, head = parts
    r = input_ids.shape[1] - prompt_len
    end = prompt_len + r - 1
    hidden = _shared_prompt_hidden(model, backbone, input_ids, attention_mask, prompt_len) if share_prompt else None
    if hidden is None:
        positions = position_ids_from_mask(attention_mask)
        out = backbone(input_ids=input_ids[:, :end], attention_mask=attention_mask[:, :end],
                       position_ids=positions[:, :end], use_cache=False)
        hidden = out.last_hidden_state[:, prompt_len - 1:]                  # (b, r, d)
    return head_logprobs(hidden, head, input_ids[:, prompt_len:], temperature, with_entropy)


def _shared_prompt_hidden(model: nn.Module, backbone: nn.Module, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor | None:
    """Hidden states `(b, r, d)` at positions `[p - 1, p + r - 1)`, each distinct prompt prefix computed
    once; None when no prompt repeats, some row's prefix `[0, p - 1)` is all padding, or the backbone
    returns no cache (activation checkpointing)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    if getattr(model, name, False) or prompt_len < 2:
        return None
    prefix = prompt_len - 1
    first, inverse = distinct_rows(input_ids[:, :prompt_len], attention_mask[:, :prompt_len])
    if len(first) == input_ids.shape[0] or not bool(attention_mask[first, :prefix].any(-1).all()):
        return None
    positions = position_ids_from_mask(attention_mask)
    head = backbone(input_ids=input_ids[first, :prefix], attention_mask=attention_mask[first, :prefix],
                    position_ids=positions[first, :prefix], use_cache=True)
    cache = returned_cache(head)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(inverse)      # (u, ...) -> (b, ...): a gather whose backward sums the G rows
    end = input_ids.shape[1] - 1
    rest = backbone(input_ids=input_ids[:, prefix:end], attention_mask=attention_mask[:, :end],
                    position_ids=positions[:, prefix:end], use_cache=True, **{cache_keyword(backbone): cache})
    return rest.last_hidden_state


# ----------------------------------------------------------------------------- the model's own forward

def _call_lm(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits `(b, keep, v)` of the last `keep` positions; the LM head is not run on the prompt."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    try:
        return model(**kwargs, logits_to_keep=keep).logits[:, -keep:]
    except TypeError:  # an architecture without `logits_to_keep`: compute all, slice
        return model(**kwargs).logits[:, -keep:]


def _shared_prompt_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          prompt_len: int) -> torch.Tensor | None:
    """Response logits `(b, r, v)` computing each distinct prompt once, or None when no prompt repeats
    (or the model cannot take a KV cache here).

    GRPO's G responses to a prompt share it: the prompt rows `(u, p)` go through the model once with a
    KV cache, the cache rows are copied to the `b` episodes (`u` -> `b`, a gather whose backward sums the
    G gradients), and the responses `(b, r - 1)` attend to it. The logits equal those of the whole
    sequences up to float rounding; the prompt's forward and backward cost u/b of before.
    """
    # checkpointed layers return no cache (the property's name changed in transformers 5.24)
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    if getattr(model, name, False):
        return None
    first, inverse = distinct_rows(input_ids[:, :prompt_len], attention_mask[:, :prompt_len])
    if len(first) == input_ids.shape[0]:
        return None
    positions = position_ids_from_mask(attention_mask)
    try:
        head = model(input_ids=input_ids[first, :prompt_len], attention_mask=attention_mask[first, :prompt_len],
                     position_ids=positions[first, :prompt_len], use_cache=True, logits_to_keep=1)
    except TypeError:   # an architecture without `logits_to_keep` or a cache: the whole-sequence path
        return None
    cache = returned_cache(head)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    first_logits = head.logits[:, -1:][inverse]                                  # (b, 1, v): scores token 0
    r = input_ids.shape[1] - prompt_len
    if r == 1:
        return first_logits
    cache.batch_select_indices(inverse)
    end = prompt_len + r - 1                        # the last response token scores nothing: not fed
    rest = model(input_ids=input_ids[:, prompt_len:end], attention_mask=attention_mask[:, :end],
                 position_ids=positions[:, prompt_len:end], use_cache=True, **{cache_keyword(model): cache})
    return torch.cat([first_logits, rest.logits], dim=1)


def response_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                     temperature: float = 1.0, with_entropy: bool = False, share_prompt: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `(b, r)` of the response tokens (and entropy `(b, r)` if asked) in one forward pass.

    input_ids / attention_mask `(b, p + r)` laid out as `pad_rollout` makes them. Logits at position
    p - 1 + t score response token t; they are divided by `temperature` before the log-softmax, so
    these are the log-probs of the sampling distribution (Huang et al. 2024). Entropy is of the same
    tempered distribution, without grad (it is only logged). Masked positions are not zeroed here (callers
    mask). `share_prompt`: rows with the same prompt compute it once (`_shared_prompt_logits`).
    Plain Llama-family models without autocast take `fused_response_forward` (the LM head,
    log-softmax and gather fused; the same values up to float rounding).
    """
    parts = head_parts(model)
    if parts is not None and not torch.is_autocast_enabled(input_ids.device.type):   # the fused path
        return fused_response_forward(model, parts, input_ids, attention_mask, prompt_len, temperature,
                                      with_entropy, share_prompt)
    r = input_ids.shape[1] - prompt_len
    logits = _shared_prompt_logits(model, input_ids, attention_mask, prompt_len) if share_prompt else None
    if logits is None:
        logits = _call_lm(model, input_ids, attention_mask, r + 1)[:, :-1]   # (b, r, v)
    if temperature != 1.0:
        logits = logits.float() / temperature
    if with_entropy:
        return logprobs_and_entropy(logits, input_ids[:, prompt_len:])
    return logprobs_from_logits(logits, input_ids[:, prompt_len:]), None
