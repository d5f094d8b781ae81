"""Rollouts for RL fine-tuning, shared by PPO (`train/ppo.py`) and GRPO (`train/grpo.py`).

One rollout = sample a response to each prompt through continuous batching (`generate.continuous`, the
decode loop `chatsmith serve` uses: at most `max_batch` rows at a time, finished rows leave and queued
prompts join at the next step), cut
each response after its end-of-turn token, and recompute, in one full forward pass, the log-probs of
the sampled tokens under the policy and the frozen reference - from the logits divided by the
sampling temperature, so they are the log-probs of the distribution the tokens were drawn from
(Huang et al. 2024, "The N+ implementation details of RLHF with PPO"). The engine's own incremental
(KV-cache) log-probs are not reused for training: the PPO ratio must compare like with like, i.e. the
same batched forward that the update later differentiates.

Layout of a rollout batch (`b` episodes, `p` longest prompt, `r` longest response):

    input_ids      (b, p + r)   prompts LEFT-padded to p, responses RIGHT-padded to r
    attention_mask (b, p + r)   1 on real prompt tokens and on response tokens up to end-of-turn
    response_mask  (b, r)       1 on response tokens up to and including end-of-turn, 0 after
    logprobs       (b, r)       log pi(y_t | x, y_<t) at temperature T (0 where masked)

The logits that score response token t sit at position p - 1 + t; a value model reads its value for
token t from the same position (the state before the token is emitted), as in the reference PPO code.

Scoring (`RewardModelScorer`, `FunctionScorer`) turns responses into one scalar each; a response that
never produced end-of-turn gets a fixed penalty instead (Huang et al. 2024: "penalty_reward_value = -1"
for responses without EOS), so the policy cannot farm the reward model with endless text.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from chatsmith.errors import ChatsmithError
from chatsmith.eval.judges import BUILTIN_REWARDS, call_reward, resolve_reward
from chatsmith.generate import SamplingConfig
from chatsmith.generate.continuous import generate_continuous
from chatsmith.model import disable_dropout, set_training
from chatsmith.train.response_logprobs import response_forward
from chatsmith.train.preference_functional import position_ids_from_mask
from chatsmith.utils import note

__all__ = [
    "Rollout", "PromptItem", "load_policy", "load_prompts", "make_scorer", "freeze", "truncate_at_stop", "pad_rollout", "response_forward", "policy_logprobs",
    "sample", "collect_rollout", "apply_no_eos_penalty", "sample_row", "RewardModelScorer", "FunctionScorer",
    "position_ids_from_mask", "value_forward", "plan_micro_batches", "rollout_micro_batches",
    "micro_batch_tensors", "select_prompts", "dropped_prompts_line", "note_context_limit", "check_reward_spec",
    "reward_model_path",
]


# ----------------------------------------------------------------------------- data

@dataclass
class PromptItem:
    """One RL prompt: the conversation so far (ends with a user turn) and, if known, the world metadata.

    `meta` keeps every other field of the row (`id`, `category`, `expected`, ...) so a programmatic
    judge can score the response; `origin` is "path:line" for error messages.
    """

    messages: list[dict]
    origin: str = ""
    meta: dict = field(default_factory=dict)
    ids: list[int] | None = None     # render_prompt(messages) - filled in once per run


@dataclass
class Rollout:
    """A batch of sampled episodes; tensors on one device. See the module docstring for the layout."""

    input_ids: torch.Tensor          # (b, p + r)
    attention_mask: torch.Tensor     # (b, p + r)
    prompt_len: int                  # p
    response_ids: torch.Tensor       # (b, r)
    response_mask: torch.Tensor      # (b, r) float
    response_lengths: torch.Tensor   # (b,) long, end-of-turn included
    finished: torch.Tensor           # (b,) bool: the response ended with an end-of-turn token
    texts: list[str]                 # decoded responses, end-of-turn text stripped
    prompt_index: list[int]          # which prompt each episode answers
    logprobs: torch.Tensor | None = None      # (b, r) policy at rollout time
    ref_logprobs: torch.Tensor | None = None  # (b, r) frozen reference
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: torch.Tensor | Sequence[int]) -> "Rollout":
        """The sub-batch of the given rows (a minibatch); trailing all-pad response columns are kept."""
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        rows_l = rows_t.tolist()
        pick = lambda t: None if t is None else t[rows_t]  # noqa: E731
        return Rollout(self.input_ids[rows_t], self.attention_mask[rows_t], self.prompt_len,
                       self.response_ids[rows_t], self.response_mask[rows_t], self.response_lengths[rows_t],
                       self.finished[rows_t], [self.texts[i] for i in rows_l],
                       [self.prompt_index[i] for i in rows_l], pick(self.logprobs), pick(self.ref_logprobs))


# ----------------------------------------------------------------------------- masks and padding

def truncate_at_stop(tokens: Sequence[int], stop_token_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Cut a response after its first end-of-turn token. Returns `(tokens kept, ended with a stop)`.

    Everything after the first stop token is discarded, even if the engine kept sampling for that row
    (in a batch the longest row decides when sampling ends); those tokens were never part of the
    assistant's turn and must carry neither reward nor gradient.
    """
    stops = set(int(t) for t in stop_token_ids)
    for i, tok in enumerate(tokens):
        if int(tok) in stops:
            return [int(t) for t in tokens[: i + 1]], True
    return [int(t) for t in tokens], False


def pad_rollout(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor,
                                                             torch.Tensor]:
    """Left-pad prompts and right-pad responses into one batch.

    Returns `input_ids (b, p + r)`, `attention_mask (b, p + r)`, `p`, `response_ids (b, r)`,
    `response_mask (b, r)` (float). Rows with an empty response get an all-zero response mask; `r` is at
    least 1 so shapes never collapse.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    p = max(len(x) for x in prompts)
    r = max(1, max(len(y) for y in responses))
    b = len(prompts)
    input_ids = torch.full((b, p + r), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, p + r), dtype=torch.long)
    for i, (x, y) in enumerate(zip(prompts, responses)):
        input_ids[i, p - len(x):p] = torch.tensor(list(x), dtype=torch.long)
        attention_mask[i, p - len(x):p] = 1
        if len(y):
            input_ids[i, p:p + len(y)] = torch.tensor(list(y), dtype=torch.long)
            attention_mask[i, p:p + len(y)] = 1
    response_ids = input_ids[:, p:].clone()
    response_mask = attention_mask[:, p:].float()
    return (input_ids.to(device), attention_mask.to(device), p, response_ids.to(device), response_mask.to(device))


# ----------------------------------------------------------------------------- length-aware micro-batches

def plan_micro_batches(prompt_lengths: Sequence[int], response_lengths: Sequence[int], max_rows: int,
                       overhead_tokens: int = 64, prompt_groups: Sequence[Any] | None = None) -> list[list[int]]:
    """Split rows into micro-batches of at most `max_rows` that spend little compute on padding.

    A micro-batch is cut to its own longest prompt and longest response (`micro_batch_tensors`), so it
    costs about `rows x (longest prompt + longest response)` tokens, plus a fixed per-call overhead
    (`overhead_tokens`, the Python and kernel-launch cost of one forward/backward in token equivalents).
    Rows are sorted by length and split into contiguous groups by dynamic programming on that cost, so one
    long prompt no longer pads every other row of the batch to its length. On the built-in world's PPO
    prompts (mean 26 tokens, longest 115) groups of up to 4 process about half the tokens of one batch of
    16. The rows of a minibatch only change how its gradient is summed, not its value (callers weight each
    micro-batch by its share of the minibatch).

    `prompt_groups`: a key per row; rows with the same key share their prompt (GRPO's G responses), which
    `response_forward` then computes once. Such rows stay in one micro-batch (up to `max_rows` of them),
    and a micro-batch costs `distinct prompts x longest prompt + rows x longest response`.
    Returns lists of row indices.
    """
    n = len(prompt_lengths)
    if n == 0:
        return []
    max_rows = max(1, int(max_rows))
    keys = list(range(n)) if prompt_groups is None else list(prompt_groups)
    by_key: dict[Any, list[int]] = {}
    for i in sorted(range(n), key=lambda i: (response_lengths[i], i)):
        by_key.setdefault(keys[i], []).append(i)
    units = [rows[k:k + max_rows] for rows in by_key.values() for k in range(0, len(rows), max_rows)]
    units.sort(key=lambda u: (max(int(prompt_lengths[i]) + int(response_lengths[i]) for i in u), u[0]))
    unit_prompt = [max(int(prompt_lengths[k]) for k in u) for u in units]
    unit_response = [max(max(int(response_lengths[k]), 1) for k in u) for u in units]
    best = [0.0] + [float("inf")] * len(units)        # best[j]: cheapest split of units[:j]
    start = [0] * (len(units) + 1)
    for j in range(1, len(units) + 1):
        longest_prompt = longest_response = rows = 0
        for i in range(j - 1, -1, -1):                 # candidate last micro-batch units[i:j]
            rows += len(units[i])
            if rows > max_rows:
                break
            longest_prompt = max(longest_prompt, unit_prompt[i])
            longest_response = max(longest_response, unit_response[i])
            cost = best[i] + overhead_tokens + (j - i) * longest_prompt + rows * longest_response
            if cost < best[j]:
                best[j], start[j] = cost, i
    groups, j = [], len(units)
    while j > 0:
        groups.append([k for unit in units[start[j]:j] for k in unit])
        j = start[j]
    return groups[::-1]


def rollout_micro_batches(rollout: "Rollout", rows: Sequence[int], max_rows: int) -> list[list[int]]:
    """`plan_micro_batches` over the given rows of a rollout (returns rollout row indices); episodes that
    answer the same prompt are kept together so their prompt is computed once."""
    rows = list(rows)
    prompt_lengths = rollout.attention_mask[rows, :rollout.prompt_len].sum(-1).tolist()
    response_lengths = rollout.response_lengths[rows].tolist()
    prompts = [tuple(x) for x in rollout.input_ids[rows, :rollout.prompt_len].tolist()]
    return [[rows[k] for k in group]
            for group in plan_micro_batches(prompt_lengths, response_lengths, max_rows, prompt_groups=prompts)]


def micro_batch_tensors(rollout: "Rollout", rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """`(input_ids, attention_mask, prompt_len, response_len)` of the rows, cut to their own longest prompt
    and longest response: the columns dropped are padding in every one of these rows, so the forward pass
    gives the same log-probs and values for the `response_len` response positions kept (positions come
    from the attention mask). Response-shaped tensors of the rollout are sliced with `[rows, :response_len]`.
    """
    index = torch.as_tensor(list(rows), dtype=torch.long, device=rollout.input_ids.device)
    p = rollout.prompt_len
    prompt_len = max(1, int(rollout.attention_mask[index, :p].sum(-1).max()))
    response_len = max(1, int(rollout.response_lengths[index].max()))
    columns = slice(p - prompt_len, p + response_len)
    return rollout.input_ids[index, columns], rollout.attention_mask[index, columns], prompt_len, response_len


# ----------------------------------------------------------------------------- forward passes

@torch.no_grad()
def policy_logprobs(model: nn.Module, rollout: Rollout, temperature: float, micro_batch: int = 0,
                    share_prompt: bool = True) -> torch.Tensor:
    """No-grad log-probs `(b, r)` of the rollout's responses, in length-grouped micro-batches of at most
    `micro_batch` rows (`rollout_micro_batches`); a prompt repeated in a micro-batch is computed once
    (`share_prompt`)."""
    b = rollout.batch_size
    out = None
    for rows in rollout_micro_batches(rollout, range(b), micro_batch if micro_batch and micro_batch > 0 else b):
        ids, mask, prompt_len, r = micro_batch_tensors(rollout, rows)
        lp, _ = response_forward(model, ids, mask, prompt_len, temperature, share_prompt=share_prompt)
        if out is None:
            out = torch.zeros(rollout.response_mask.shape, dtype=lp.dtype, device=lp.device)
        out[rows, :r] = lp
    return out * rollout.response_mask


def value_forward(value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prompt_len: int) -> torch.Tensor:
    """Per-token values `(b, r)` from a sequence-classification model used as a value model.

    The backbone's hidden states `(b, p + r, h)` go through the model's scalar head (`score`, a
    `Linear(h, 1)`) at every position - a value head per token, initialised from the reward model
    (Ziegler et al. 2019; Huang et al. 2024). The value of response token t is read at position
    p - 1 + t, the state in which token t is chosen.
    """
    backbone = getattr(value_model, value_model.base_model_prefix)
    head = value_model.score
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    r = input_ids.shape[1] - prompt_len
    return head(hidden[:, prompt_len - 1:prompt_len - 1 + r]).squeeze(-1).float()


# ----------------------------------------------------------------------------- sampling

def sample(model: nn.Module, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
           temperature: float, stop_token_ids: Sequence[int], seed: int | None,
           generate_fn: Callable | None = None, first_row: int = 0,
           max_batch: int = 0) -> tuple[list[list[int]], list[bool]]:
    """Sample one response per prompt through continuous batching, at most `max_batch` rows at a time
    (0 = all); cut after end-of-turn.

    Sampling is plain ancestral sampling at `temperature` (no top-k / top-p / repetition penalty): any
    other filter would make the recomputed log-probs differ from the distribution the tokens came from.
    `first_row`: the rows' index in a batch split over processes (row i draws from `(seed, first_row + i)`,
    so `max_batch` changes no sample). Returns `(responses, finished)`.
    """
    if temperature <= 0:
        raise ChatsmithError("RL sampling needs --temperature > 0 (the policy must explore, and log-probs "
                             "of greedy decoding are not those of the sampled distribution)")
    if generate_fn is None:
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                             repetition_penalty=1.0, seed=seed, stop_token_ids=tuple(stop_token_ids),
                             stop_strings=(), first_row=first_row, logprobs=False)   # recomputed in one pass
        sequences = generate_continuous(model, tokenizer, prompt_ids, cfg, max_batch=max_batch).sequences
    else:
        sequences = generate_fn(model, tokenizer, prompt_ids, max_new_tokens, temperature, stop_token_ids, seed)
    responses, finished = [], []
    for seq in sequences:
        kept, done = truncate_at_stop(seq[:max_new_tokens], stop_token_ids)
        responses.append(kept)
        finished.append(done)
    return responses, finished


def collect_rollout(policy: nn.Module, reference: nn.Module | None, tokenizer: Any,
                    prompt_ids: Sequence[Sequence[int]], prompt_index: Sequence[int], *, max_new_tokens: int,
                    temperature: float, stop_token_ids: Sequence[int], seed: int | None,
                    forward_batch_size: int = 0, need_policy_logprobs: bool = True,
                    generate_fn: Callable | None = None, first_row: int = 0, share_prompt: bool = True,
                    max_batch: int = 0) -> Rollout:
    """Sample, pad, and compute rollout-time policy and reference log-probs (no grad).

    `need_policy_logprobs=False` skips the policy forward: with a single update per batch the "old"
    log-probs equal the current ones, and the update computes them with grad anyway (GRPO's default,
    as in TRL's GRPOTrainer with num_iterations=1).
    """
    device = next(policy.parameters()).device
    was_training = policy.training
    set_training(policy, False)
    t0 = time.perf_counter()
    responses, finished = sample(policy, tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                                 temperature=temperature, stop_token_ids=stop_token_ids, seed=seed,
                                 generate_fn=generate_fn, first_row=first_row, max_batch=max_batch)
    t1 = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, attention_mask, p, response_ids, response_mask = pad_rollout(prompt_ids, responses, pad_id, device)
    stop_set = set(int(t) for t in stop_token_ids)
    texts = [tokenizer.decode([t for t in y if t not in stop_set], skip_special_tokens=False) for y in responses]
    rollout = Rollout(input_ids, attention_mask, p, response_ids, response_mask,
                      torch.tensor([len(y) for y in responses], dtype=torch.long, device=device),
                      torch.tensor(finished, dtype=torch.bool, device=device), texts, list(prompt_index))
    if need_policy_logprobs:
        rollout.logprobs = policy_logprobs(policy, rollout, temperature, forward_batch_size, share_prompt)
    if reference is not None:
        rollout.ref_logprobs = policy_logprobs(reference, rollout, temperature, forward_batch_size, share_prompt)
    set_training(policy, was_training)
    rollout.timings = {"generate_s": t1 - t0, "logprob_s": time.perf_counter() - t1}
    return rollout


# ----------------------------------------------------------------------------- scoring

def apply_no_eos_penalty(scores: torch.Tensor, finished: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Replace the score of every response without an end-of-turn token by `penalty` (`(b,)` -> `(b,)`).

    Huang et al. 2024 (detail "no EOS token penalty"): a truncated response gets a fixed low score
    instead of the reward model's, which was never trained on unfinished turns. `None` = keep RM scores.
    """
    if penalty is None:
        return scores
    return torch.where(finished, scores, torch.full_like(scores, float(penalty)))


def sample_row(step: int, prompt: PromptItem, rollout: Rollout, i: int, score: float) -> dict[str, Any]:
    """One row of the samples table (OUT/samples.jsonl): the prompt's last user message, response i, its score."""
    user = next((m["content"] for m in reversed(prompt.messages) if m["role"] == "user"), "")
    return {"step": step, "prompt": user, "response": rollout.texts[i], "score": round(float(score), 4),
            "ended_turn": bool(rollout.finished[i])}


class RewardModelScorer:
    """Scores episodes with a frozen reward model (`chatsmith.reward_model.RewardModel`).

    When the reward model shares the policy's vocabulary (both come from the same SFT model, the usual
    case) it reads the sampled token ids directly - prompt + response up to the end-of-turn token, no
    decode / re-encode round trip that could change the tokens - and its scalar is read at the last
    token. Otherwise each response is decoded and the conversation re-rendered in the reward model's
    own chat format. Scores are normalised with the (mean, std) saved with the reward model.
    Responses without end-of-turn are not scored when a no-EOS penalty will replace their score.
    """

    def __init__(self, rm: Any, same_vocabulary: bool = True, policy_tokenizer: Any = None,
                 forward_batch_size: int = 16):
        self.rm, self.same_vocabulary = rm, same_vocabulary
        self.policy_tokenizer = policy_tokenizer
        self.forward_batch_size = max(1, forward_batch_size or 16)
        self.skip_unfinished = False

    @property
    def model(self) -> nn.Module:
        return self.rm.model

    @torch.no_grad()
    def __call__(self, rollout: Rollout, prompts: Sequence[PromptItem] | None = None) -> torch.Tensor:
        b = rollout.batch_size
        rows = [i for i in range(b) if not (self.skip_unfinished and not bool(rollout.finished[i]))]
        scores = torch.zeros(b, dtype=torch.float32)
        if rows and self.same_vocabulary:
            mask = rollout.attention_mask.bool()
            seqs = [rollout.input_ids[i][mask[i]].tolist() for i in rows]
            scores[rows] = self.rm.score_token_ids(seqs, batch_size=self.forward_batch_size)
        elif rows:
            if prompts is None:
                raise ChatsmithError("scoring with a reward model of another vocabulary needs the prompts")
            from chatsmith.reward_model import score_conversations

            convs = [list(prompts[rollout.prompt_index[i]].messages)
                     + [{"role": "assistant", "content": rollout.texts[i]}] for i in rows]
            scores[rows] = score_conversations(self.rm, conversations=convs, batch_size=self.forward_batch_size)
        return scores.to(rollout.input_ids.device)


class FunctionScorer:
    """A reward function as the scorer of rollouts (the protocol of `chatsmith.eval.judges`).

    `reward_fn(messages, response, row[, finished=])` -> float per response, where `row` is the prompt
    row's other fields (`id`, `category`, `expected`, ...). `--reward world` is the world's judge this way
    (a verifiable reward); `--reward py:module:function` is the user's. An error from the function is
    reported with the prompt's origin (file:line).
    """

    def __init__(self, reward_fn: Callable[..., float], spec: str = ""):
        self.reward_fn, self.spec = reward_fn, spec

    def score_one(self, prompt: PromptItem, response: str, finished: bool = True) -> float:
        try:
            return call_reward(self.reward_fn, prompt.messages, response, prompt.meta, finished)
        except ChatsmithError as exc:
            raise ChatsmithError(f"{prompt.origin}: {exc}") from None

    def __call__(self, rollout: Rollout, prompts: Sequence[PromptItem]) -> torch.Tensor:
        scores = [self.score_one(prompts[idx], text, done)
                  for text, idx, done in zip(rollout.texts, rollout.prompt_index, rollout.finished.tolist())]
        return torch.tensor(scores, dtype=torch.float32, device=rollout.input_ids.device)


# ----------------------------------------------------------------------------- loading

def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the frozen reference and reward models."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_policy(path: str, device: str, template: str | None = None) -> tuple[nn.Module, Any, Any]:
    """`(model, tokenizer, chat format)` of a local HF causal-LM directory, dropout off.

    Through `chatsmith.model.load_model` (which adds a pad token and sets the template if missing).
    """
    from chatsmith.model import load_model

    loaded = load_model(path, device=device, template=template)
    model, tokenizer, fmt = loaded.model, loaded.tokenizer, loaded.fmt
    disable_dropout(model)
    return model, tokenizer, fmt


def load_prompts(path: str, tokenizer: Any, fmt: Any, max_prompt_len: int) -> tuple[list[PromptItem], int]:
    """RL prompts from any conversation file `load_examples` reads (messages up to the last user turn),
    through `select_prompts`: returns the kept prompts and how many were dropped as too long."""
    from chatsmith.data.formats import load_examples

    if not Path(path).exists():
        raise ChatsmithError(f"--prompts {path}: file not found (export the world's prompts with "
                             f"`chatsmith world export DIR`, or give a JSONL of {{\"messages\": [...]}} rows)")
    result = load_examples(path, kind="prompt")
    return select_prompts(result.examples, tokenizer, fmt, max_prompt_len, path)


def note_context_limit(stage: str, max_len: int, policy: nn.Module, tokenizer: Any) -> None:
    """Say when --max-len exceeds the policy's context: sampling caps prompt + response to the context."""
    from chatsmith.model import max_context_length

    context = max_context_length(policy, tokenizer)
    if max_len > context:
        note(f"{stage}: --max-len {max_len} is more than the policy's context of {context} tokens; prompt + "
             f"response are capped to {context}")


def dropped_prompts_line(stage: str, dropped: int, budget: int) -> str:
    """What a sampling stage tells the user about the prompts `select_prompts` dropped."""
    return (f"{stage}: skipped {dropped} prompt(s) longer than {budget} tokens (--max-len minus --max-new-tokens; "
            "prompts are dropped whole, never cut)")


def select_prompts(examples: Sequence[Any], tokenizer: Any, fmt: Any, max_prompt_len: int,
                   source: str) -> tuple[list[PromptItem], int]:
    """Render each prompt once with the generation prompt appended; keep those of at most `max_prompt_len`
    tokens (`chatsmith.data.rules.prompt_budget`), dropping the rest whole, since a cut prompt is a
    different question. Every other field of a row (`id`, `category`, `expected`, ...) is kept in
    `PromptItem.meta` for programmatic judges. No prompt left is an error naming `source`."""
    from chatsmith.chat.render import render_prompt
    from chatsmith.data.rules import require_rows

    items, dropped = [], 0
    for ex in examples:
        ids = render_prompt(ex.messages, tokenizer, fmt, tools=getattr(ex, "tools", None))
        if len(ids) > max_prompt_len:
            dropped += 1
            continue
        items.append(PromptItem(ex.messages, ex.origin, dict(ex.meta), ids))
    require_rows(items, source, f"none of the {len(examples)} prompts fits in {max_prompt_len} tokens",
                 "raise --max-len or lower --max-new-tokens")
    return items, dropped


def _same_vocabulary(a: Any, b: Any) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def reward_model_path(spec: str) -> str | None:
    """The directory a reward spec names (`rm:PATH` or a bare `PATH`); None for `world` and `py:` specs."""
    if spec in BUILTIN_REWARDS or spec.startswith("py:"):
        return None
    return spec[3:] if spec.startswith("rm:") else spec


def check_reward_spec(spec: str, flag: str) -> None:
    """Refuse, before any model is loaded, a reward spec naming a directory that is not a trained reward model."""
    from chatsmith.reward_model import check_reward_model_dir

    path = reward_model_path(spec)
    if path is None:
        return
    try:
        check_reward_model_dir(path)      # a local directory or a Hub id (`chatsmith.model.checked_model_source`)
    except ChatsmithError as exc:
        raise ChatsmithError(f"{flag} {exc}") from None


def make_scorer(spec: str, policy_tokenizer: Any, device: str, forward_batch_size: int = 16):
    """A reward function `(rollout, prompts) -> scores (b,)` from a spec.

    - `world`: the built-in world's programmatic judge (verifiable reward);
    - `py:MODULE:FUNCTION`: the user's reward function (see `chatsmith.eval.judges`);
    - `rm:PATH` or a bare `PATH`: a reward model written by `chatsmith reward` (normalised scores).
    """
    if spec in BUILTIN_REWARDS or spec.startswith("py:"):
        return FunctionScorer(resolve_reward(spec), spec)
    path = spec[3:] if spec.startswith("rm:") else spec
    from chatsmith.reward_model import load_reward_model

    rm = load_reward_model(path, device=device)
    return RewardModelScorer(rm, same_vocabulary=_same_vocabulary(rm.tokenizer, policy_tokenizer),
                             policy_tokenizer=policy_tokenizer, forward_batch_size=forward_batch_size)
