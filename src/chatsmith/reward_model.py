"""Reward-model scoring: load a reward model and score conversations or token sequences with it.

    from chatsmith.reward_model import load_reward_model, score_conversations
    rm = load_reward_model("runs/rm", device="cpu")                # -> RewardModel (eval mode, no grad)
    scores = score_conversations(rm, rm.tokenizer, rm.fmt, conversations, batch_size=16)
        # conversations: list of message lists ending with the assistant reply to score
        # -> (n,) float32 CPU tensor, normalised (mean 0 / std 1 on SFT samples); normalize=False: raw
    scores = rm.score_token_ids(sequences)   # sequences already in the RM's vocabulary: list[list[int]],
        # each ending at the response's end-of-turn token -> (n,) float32 CPU, normalised
    values = token_scores(rm.model, input_ids, attention_mask)     # (b, t): the head at every position
        # (raw, unnormalised; for a value model initialised from the reward model)
    rewards = sequence_rewards(model, input_ids, attention_mask)   # (b,) raw, last real token, with grad

A reward model is a decoder's transformer with a scalar head (`AutoModelForSequenceClassification`,
num_labels=1) read at the LAST REAL TOKEN of each conversation, i.e. the end-of-turn token closing the
response. The index comes from the attention mask (correct under left or right padding and when
pad == eos; HF's own pooling looks for the last non-pad id instead). The (mean, std) normalisation
saved by `chatsmith reward` is read from config.json (`chatsmith_reward_mean` / `chatsmith_reward_std`)
or `reward_normalization.json`. Used by PPO/GRPO (rewards, value-model init), evaluation and
`chatsmith score`; training lives in `chatsmith.train.reward`. A LoRA reward adapter directory
(`chatsmith reward --lora-r`) loads as its base with the adapter and score head merged (`load_reward_adapter`);
one trained with `--ensemble N` loads as a `RewardEnsemble` scoring the mean of its members' normalised scores.
This API is stable: extend it only with defaulted keyword arguments.

Run the tests: `python -m pytest tests/test_reward.py -q`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from chatsmith.errors import ChatsmithError, DataError
from chatsmith.train.preference_functional import PackedTrees, gather_last_token, position_ids_from_mask

__all__ = [
    "RewardModel", "load_reward_model", "score_conversations", "token_scores", "sequence_rewards",
    "packed_rewards", "backbone_hidden", "backbone", "score_head", "mask_for_model", "render_for_scoring",
    "NORM_MEAN_KEY", "NORM_STD_KEY", "FORMAT_KEY", "NORM_FILE", "check_reward_model_dir", "score_head_in_weights",
    "load_reward_adapter", "RewardEnsemble", "ENSEMBLE_FILE", "ensemble_member_dirs",
]

NORM_MEAN_KEY = "chatsmith_reward_mean"
NORM_STD_KEY = "chatsmith_reward_std"
FORMAT_KEY = "chatsmith_chat_format"
NORM_FILE = "reward_normalization.json"
ENSEMBLE_FILE = "reward_ensemble.json"   # `chatsmith reward --ensemble N`: the other members' directories


# ----------------------------------------------------------------------------- model plumbing

def backbone(model: nn.Module) -> nn.Module:
    """The bare transformer (LlamaModel, Qwen2Model, GPT2Model...) under a task head."""
    prefix = getattr(model, "base_model_prefix", "model")
    inner = getattr(model, prefix, None)
    if inner is None:
        raise ChatsmithError(f"{type(model).__name__} has no '{prefix}' backbone attribute")
    return inner


def score_head(model: nn.Module) -> nn.Module:
    head = getattr(model, "score", None)
    if head is None:
        raise ChatsmithError(f"{type(model).__name__} has no `score` head; chatsmith reward models are "
                             "*ForSequenceClassification models of decoder architectures (Llama, Qwen2, GPT-2, ...)")
    return head


def trainable_score_head(model: nn.Module) -> nn.Linear:
    """The `score` Linear that trains: the head itself, or under LoRA peft's trainable copy of it
    (`modules_to_save`), leaving the frozen original the reward is scored with untouched."""
    head = score_head(model)
    copies = getattr(head, "modules_to_save", None)
    if copies is not None:
        head = copies[head.active_adapter if isinstance(head.active_adapter, str) else head.active_adapter[0]]
    return head


@torch.no_grad()
def fold_normalization_into_head(model: nn.Module, mean: float, std: float) -> None:
    """Rescale a reward model's trainable score head in place so that it outputs `(raw - mean) / std`.

    PPO's value model starts as a copy of the reward model (Ziegler et al. 2019), but PPO's rewards are the
    normalised scores (mean 0, std 1 over SFT samples, `chatsmith reward`). A copy left in raw units predicts
    values `std` times too large (the world's reward models: std 4 to 5), so the first steps' advantages are
    mostly the value model's error (explained variance about -3) until it has relearnt the scale. The weight
    is divided by `std`; a head with a bias also takes the mean off, a head without one (Llama, Qwen2: bias=False)
    keeps an offset of `-mean / std`, which the value loss removes within a few steps.
    """
    head = trainable_score_head(model)
    head.weight.div_(std)
    if head.bias is not None:
        head.bias.sub_(mean).div_(std)


def mask_for_model(model: nn.Module, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D bool mask as the model's attention implementation wants it (eager adds masks to scores)."""
    if mask.ndim != 4:
        return mask
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl == "sdpa" or impl == "flex_attention":
        return mask
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ChatsmithError(f"attention implementation {impl!r} cannot take chatsmith's packed tree mask; "
                         "load the model with attn_implementation='sdpa' or 'eager'")


def backbone_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states `(b, t, h)` of the model's transformer (after its final norm).

    attention_mask: `(b, t)` 0/1 padding mask, or a `(b, 1, t, t)` bool mask (packed trees). With a 2D
    mask, positions are counted over real tokens only, so left and right padding give the same result.
    """
    if position_ids is None and attention_mask.ndim == 2:
        position_ids = position_ids_from_mask(attention_mask)
    dtype = next(model.parameters()).dtype
    out = backbone(model)(input_ids=input_ids, attention_mask=mask_for_model(model, attention_mask, dtype),
                           position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def sequence_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Raw reward `(b,)` float32 of each row, read at its last real token (from `attention_mask (b, t)`).

    The head runs on the `(b, h)` pooled states only. Differentiable (used for training and PPO values).
    """
    hidden = backbone_hidden(model, input_ids, attention_mask)
    return score_head(model)(gather_last_token(hidden, attention_mask)).squeeze(-1).float()


def token_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position `(b, t)` float32 (raw). Row i's reward is at its last real token."""
    hidden = backbone_hidden(model, input_ids, attention_mask)
    return score_head(model)(hidden).squeeze(-1).float()


def packed_rewards(model: nn.Module, batch: PackedTrees) -> torch.Tensor:
    """Raw rewards `(n,)` float32 of every conversation in a packed tree batch (one forward)."""
    hidden = backbone_hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids)
    pooled = hidden.reshape(-1, hidden.shape[-1])[batch.last_token]
    return score_head(model)(pooled).squeeze(-1).float()


# ----------------------------------------------------------------------------- rendering

def render_for_scoring(messages: list[dict], tokenizer: Any, fmt: Any, max_len: int | None = None,
                       where: str = "conversation") -> tuple[list[int], list[int], bool]:
    """Token ids of a conversation ending at the end-of-turn token of its final assistant reply.

    Returns `(ids, response_mask, truncated)`: `response_mask` is 1 on the final reply's tokens and its
    end-of-turn token (the last contiguous run of `render_chat`'s assistant mask) and 0 elsewhere;
    anything the template renders after the end-of-turn (e.g. chatml's newline) is dropped so the last
    token IS the end-of-turn. Sequences longer than `max_len` lose tokens from the LEFT (the prompt's
    start) so the response and its end-of-turn are kept.
    """
    from chatsmith.chat.render import render_chat

    if not messages or messages[-1].get("role") != "assistant":
        raise DataError(f"{where}: the last message must be the assistant reply to score "
                        f"(got role {messages[-1].get('role') if messages else None!r})")
    rendered = render_chat(messages, tokenizer, fmt)
    ids, mask = list(rendered.input_ids), list(rendered.assistant_mask)
    ones = [i for i, m in enumerate(mask) if m]
    if not ones:
        raise DataError(f"{where}: the chat format produced no assistant tokens for the reply")
    last = ones[-1]
    start = last
    while start > 0 and mask[start - 1]:
        start -= 1
    ids = ids[:last + 1]
    response_mask = [0] * start + [1] * (last + 1 - start)
    truncated = False
    if max_len and len(ids) > max_len:
        cut = len(ids) - max_len
        ids, response_mask, truncated = ids[cut:], response_mask[cut:], True
    return ids, response_mask, truncated


# ----------------------------------------------------------------------------- scoring API

@dataclass
class RewardModel:
    """A loaded reward model: HF sequence-classification model + tokenizer + chat format + normalisation."""

    model: nn.Module
    tokenizer: Any
    fmt: Any
    mean: float = 0.0
    std: float = 1.0
    path: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """(raw - mean) / std with the normalisation saved at training time."""
        return (raw - self.mean) / self.std

    @torch.no_grad()
    def score_token_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 16,
                        normalize: bool = True) -> torch.Tensor:
        """Scores `(n,)` float32 on CPU of token sequences (each ending at the response's end-of-turn).

        Sequences are sorted by length into right-padded batches (little padding), scored at their last
        real token and returned in the input order. Longer than the model's context: cut from the left.
        """
        n = len(sequences)
        out = torch.empty(n, dtype=torch.float32)
        if n == 0:
            return out
        limit = getattr(self.model.config, "max_position_embeddings", None)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(n), key=lambda i: len(sequences[i]))
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, n, max(1, batch_size)):
                idx = order[start:start + batch_size]
                rows = [list(sequences[i])[-limit:] if limit else list(sequences[i]) for i in idx]
                if any(len(r) == 0 for r in rows):
                    raise ChatsmithError("cannot score an empty token sequence")
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, r in enumerate(rows):
                    ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
                    mask[j, :len(r)] = 1
                raw = sequence_rewards(self.model, ids.to(self.device), mask.to(self.device)).cpu()
                out[torch.tensor(idx)] = raw
        finally:
            self.model.train(was_training)
        return self.normalize(out) if normalize else out


@dataclass
class RewardEnsemble:
    """Reward models trained alike but for their seed, scoring as one: the mean of their normalised scores.

    RL that optimises the mean exploits any one member's errors less (Coste et al. 2024, "Reward Model
    Ensembles Help Mitigate Overoptimization"; Eisenstein et al. 2023, on how far that goes when the members
    share their pretraining, as here they share the SFT model). `chatsmith reward
    --ensemble N` writes the members; `load_reward_model` returns this when OUT names them. The interface
    is `RewardModel`'s: `model`, `tokenizer` and `fmt` are the first member's (all share one vocabulary).
    """

    members: list[RewardModel]
    path: str | None = None

    @property
    def model(self) -> nn.Module:
        return self.members[0].model

    @property
    def tokenizer(self) -> Any:
        return self.members[0].tokenizer

    @property
    def fmt(self) -> Any:
        return self.members[0].fmt

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """The identity: an ensemble's scores are already the mean of normalised scores."""
        return raw

    @torch.no_grad()
    def score_token_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 16,
                        normalize: bool = True) -> torch.Tensor:
        """`(n,)` float32 on CPU: the mean over members of each member's normalised score (`normalize` is
        accepted for `RewardModel`'s signature; raw scores of different members are not on one scale)."""
        return torch.stack([m.score_token_ids(sequences, batch_size) for m in self.members]).mean(0)


def ensemble_member_dirs(path: str | Path) -> list[Path]:
    """The extra members a reward-model directory names in ENSEMBLE_FILE (empty: a single model)."""
    file = Path(path) / ENSEMBLE_FILE
    if not file.is_file():
        return []
    try:
        names = json.loads(file.read_text())["members"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ChatsmithError(f"{file}: not a reward-ensemble file ({exc}); train again with `chatsmith reward "
                             "--ensemble N`") from None
    dirs = [Path(path) / str(name) for name in names]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise ChatsmithError(f"{file}: member directory {missing[0]} is missing; train again with "
                             "`chatsmith reward --ensemble N --resume`")
    return dirs


def score_head_in_weights(path: Path) -> bool | None:
    """Whether the safetensors weights in ``path`` hold a ``score`` head (None: no safetensors to read)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = list(json.loads(index.read_text()).get("weight_map", {}))
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            return None
        names = []
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                names += list(f.keys())
    return any(n == "score.weight" or n.endswith(".score.weight") for n in names)


TRAIN_ONE = "; train a reward model with `chatsmith reward`"


def check_reward_model_dir(path: str | Path) -> None:
    """Refuse a directory that is not a trained reward model, before loading it.

    A reward model is a sequence-classification model whose score head was trained: it carries the
    normalisation `chatsmith reward` saves (config keys or `reward_normalization.json`), or has
    ``num_labels == 1`` and the head's weights in its safetensors. A causal LM (an SFT or base model) would
    otherwise be scored with a freshly, randomly initialised head.
    """
    from chatsmith.model import checked_model_source, model_config_dict
    from chatsmith.adapters import is_adapter_dir, read_adapter_config

    source, hub = checked_model_source(path, TRAIN_ONE)
    if not hub and is_adapter_dir(source):
        task = read_adapter_config(source).get("task_type")
        if task != "SEQ_CLS":
            raise ChatsmithError(f"{source}: a LoRA adapter of a chat model (task_type {task}), not a reward model; "
                                 "train one with `chatsmith reward`")
        return
    config, source, hub = model_config_dict(path, TRAIN_ONE)
    local = None if hub else Path(source)       # a Hub id: its config is all that is read before loading
    path = local or source
    if (NORM_MEAN_KEY in config and NORM_STD_KEY in config) or (local is not None and (local / NORM_FILE).is_file()):
        return
    archs = [str(a) for a in config.get("architectures") or []]
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ChatsmithError(f"{path}: this is a causal LM ({', '.join(archs)}), not a reward model; train one "
                             "with `chatsmith reward`")
    # transformers writes id2label only when it differs from its default of two labels
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
    if labels != 1:
        raise ChatsmithError(f"{path}: a reward model has one output (num_labels=1), this one has {labels}; "
                             "train one with `chatsmith reward`")
    if local is not None and score_head_in_weights(local) is False:
        raise ChatsmithError(f"{path}: the weights hold no trained score head (score.weight), so its scores "
                             "would be random; train a reward model with `chatsmith reward`")


def load_reward_model(path: str | Path, device: str = "auto", dtype: torch.dtype | str | None = None,
                      template: str | None = None, ensemble: bool = True) -> RewardModel | RewardEnsemble:
    """Load a reward-model directory written by `chatsmith reward` (or any HF seq-classification dir).

    The normalisation comes from config.json (`chatsmith_reward_mean/std`), else
    reward_normalization.json, else (0, 1). The chat format is the one the model was trained with
    (`template` overrides it; needed only for directories chatsmith did not write). A directory trained
    with `--ensemble N` loads as a `RewardEnsemble` of all N (`ensemble=False`: its first member only).
    """
    first = _load_one_reward_model(path, device, dtype, template)
    members = ensemble_member_dirs(first.path) if ensemble and first.path else []
    if not members:
        return first
    loaded = [first] + [_load_one_reward_model(d, device, dtype, template) for d in members]
    for d, m in zip(members, loaded[1:]):
        if m.tokenizer.get_vocab() != first.tokenizer.get_vocab():
            raise ChatsmithError(f"{d}: this ensemble member's vocabulary differs from {first.path}'s")
    return RewardEnsemble(loaded, first.path)


def _load_one_reward_model(path: str | Path, device: str, dtype: torch.dtype | str | None,
                           template: str | None) -> RewardModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from chatsmith.chat.templates import get_format
    from chatsmith.utils import resolve_device

    from chatsmith.model import checked_model_source, hub_where
    from chatsmith.adapters import is_adapter_dir

    source, hub = checked_model_source(path, TRAIN_ONE)
    check_reward_model_dir(source)
    path = Path(source)
    adapter = not hub and is_adapter_dir(path)
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "auto": None}[dtype]
    kwargs = {"dtype": dtype} if dtype is not None else {}
    from chatsmith.model import quiet_transformers

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if adapter:
            model = load_reward_adapter(path, tokenizer, dtype)
        else:
            with quiet_transformers():
                model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, **kwargs)
    except ChatsmithError:
        raise
    except Exception as exc:  # noqa: BLE001 - many library error types; report them as one clear line
        raise ChatsmithError(f"{hub_where(source) if hub else source}: cannot load the reward model: {exc}") from None
    if getattr(model.config, "num_labels", 1) != 1:
        raise ChatsmithError(f"{path}: a reward model has one output (num_labels=1), this one has "
                             f"{model.config.num_labels}")
    if tokenizer.pad_token_id is None:
        raise ChatsmithError(f"{path}: the tokenizer has no pad token; chatsmith reward models always set one")
    fmt_name = template or getattr(model.config, FORMAT_KEY, None)
    try:
        fmt = get_format(fmt_name, tokenizer)
    except ChatsmithError:
        fmt = get_format(None, tokenizer)
    mean = getattr(model.config, NORM_MEAN_KEY, None)
    std = getattr(model.config, NORM_STD_KEY, None)
    if (mean is None or std is None) and not hub and (path / NORM_FILE).is_file():
        saved = json.loads((path / NORM_FILE).read_text())
        mean, std = saved.get("mean"), saved.get("std")
    model.to(resolve_device(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return RewardModel(model, tokenizer, fmt, float(mean if mean is not None else 0.0),
                       float(std if std else 1.0), str(path))


def load_reward_adapter(path: Path, tokenizer: Any, dtype: Any = None) -> nn.Module:
    """A reward-model LoRA adapter directory (task SEQ_CLS) as one plain sequence-classification model.

    Its base (``base_model_name_or_path``) is either a causal LM (the SFT model `chatsmith reward --lora-r`
    started from: the reward model is rebuilt from it as training built it) or a reward model (a PPO value
    adapter: loaded by `load_reward_model`, so it may be an adapter too); the adapters and the saved score
    head are then merged in."""
    from chatsmith.model import load_model, model_config_dict, resize_to_tokenizer
    from chatsmith.adapters import adapter_base, is_adapter_dir, merge_adapter, read_adapter_config

    base = adapter_base(path, read_adapter_config(path))
    if is_adapter_dir(base):
        reward_base = read_adapter_config(base).get("task_type") == "SEQ_CLS"
    else:
        archs = model_config_dict(base)[0].get("architectures") or []
        reward_base = any(str(a).endswith("ForSequenceClassification") for a in archs)
    if reward_base:
        model = load_reward_model(base, device="cpu", dtype=dtype).model
    else:
        from chatsmith.train.reward import reward_model_from_causal_lm   # the builder training used

        causal = load_model(base, device="cpu", dtype=dtype, require_template=False).model
        resize_to_tokenizer(causal, tokenizer)
        model = reward_model_from_causal_lm(causal, tokenizer)
    resize_to_tokenizer(model, tokenizer)
    return merge_adapter(model, path)


def score_conversations(rm: RewardModel, tokenizer: Any = None, fmt: Any = None,
                        conversations: Sequence[list[dict]] = (), batch_size: int = 16,
                        normalize: bool = True, max_len: int | None = None) -> torch.Tensor:
    """Reward of each conversation's final assistant reply: `(n,)` float32 on CPU.

    Each conversation is a list of messages ending with the assistant reply; it is rendered with the
    RM's chat format (`tokenizer`/`fmt` default to the RM's own; pass them only to override) up to the
    reply's end-of-turn token and scored there. Normalised with the saved (mean, std) unless
    `normalize=False`.
    """
    tokenizer = tokenizer if tokenizer is not None else rm.tokenizer
    fmt = fmt if fmt is not None else rm.fmt
    sequences = []
    for i, messages in enumerate(conversations):
        ids, _, _ = render_for_scoring(list(messages), tokenizer, fmt, max_len, where=f"conversation {i}")
        sequences.append(ids)
    return rm.score_token_ids(sequences, batch_size=batch_size, normalize=normalize)
