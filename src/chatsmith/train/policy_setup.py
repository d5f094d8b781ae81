"""The setup PPO and GRPO share: a `Run`, the ranks, the seed, the policy (LoRA adapters with `--lora-r`) and its
frozen reference, the end-of-turn ids responses stop at, the reward scorer, the prompts and their batches.

`PolicyStage` is the base class of `ppo.PPOTrainer` and `grpo.GRPOTrainer`; their constructors call
`setup_policy` first (after checking the config), then the functions below. Not a command; tests:
`python -m pytest tests/test_ppo.py tests/test_grpo.py tests/test_lora.py -q`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from chatsmith.data.rules import prompt_budget
from chatsmith.errors import ChatsmithError
from chatsmith.model import disable_dropout, restrict_embedding_training
from chatsmith.train.batching import ShardedBatchSource
from chatsmith.train.devices import Precision
from chatsmith.train.lora import DisabledAdapterView, apply_lora, lora_enabled
from chatsmith.train.rollout import (PromptItem, dropped_prompts_line, freeze, load_policy, load_prompts, make_scorer,
                                     note_context_limit)
from chatsmith.train.run import Run, Stage, TrainResult
from chatsmith.utils import note, rank, set_seed, world_size

__all__ = ["PolicyStage", "end_of_turn_ids", "reward_scorer", "load_stage_prompts", "prompt_batches"]


class PolicyStage(Stage):
    """A stage that trains a policy on responses it samples itself (PPO, GRPO). `setup_policy` sets every
    attribute below; the stage adds its optimizer, scheduler, source and whatever else its step needs."""

    cfg: Any
    runner: Run
    device: str
    amp_dtype: Any                       # torch dtype of autocast, or None
    precision: Precision
    distributed: bool                    # under torchrun
    rank: int = 0
    world: int = 1
    lora: bool = False                   # --lora-r: the policy trains adapters
    policy: nn.Module
    reference: nn.Module | None          # frozen; None when the stage has no KL term
    fmt: Any                             # the chat format
    stop_token_ids: list[int]

    def setup_policy(self, cfg: Any, model: str, reference_from: str | None, policy: nn.Module | None = None,
                     tokenizer: Any = None, fmt: Any = None, reference: nn.Module | None = None) -> None:
        """The `Run` (claims OUT, picks the device and precision, joins torchrun's process group), the seed,
        then the policy from `model` (unless given, with its tokenizer and format) with LoRA adapters under
        --lora-r, then the reference from `reference_from` (unless given; None = no reference). With LoRA a
        reference at the policy's own path is the policy with its adapters off (`DisabledAdapterView`): no
        second copy. The seed is set before any weights are made, so a seed gives the same adapters."""
        self.runner = Run(cfg, self.name)
        self.cfg = cfg
        self.sample_every, self.num_samples = cfg.sample_every, cfg.num_samples
        self.device, self.amp_dtype = self.runner.device, self.runner.amp_dtype
        self.precision = self.runner.precision
        self.distributed = self.runner.distributed
        self.rank, self.world = (rank(), world_size()) if self.distributed else (0, 1)
        set_seed(cfg.seed)
        if policy is None:
            policy, tokenizer, fmt = load_policy(model, self.device, cfg.template)
        self.lora = lora_enabled(cfg)
        if self.lora:
            policy = apply_lora(policy, cfg, base=model)
        if reference is None and reference_from is not None:
            if self.lora and Path(reference_from).resolve() == Path(model).resolve():
                reference = DisabledAdapterView(policy)   # the same weights, adapters off: no second copy
            else:
                reference = load_policy(reference_from, self.device, cfg.template)[0]
        self.policy = disable_dropout(policy.to(self.device))
        if not self.lora:
            restrict_embedding_training(self.policy, tokenizer, fmt, cfg.train_embeddings)
        if reference is not None and not isinstance(reference, DisabledAdapterView):
            reference = freeze(disable_dropout(reference.to(self.device)))
        self.reference = reference
        self.tokenizer, self.fmt = tokenizer, fmt
        note_context_limit(self.name, cfg.max_len, self.policy, tokenizer)
        self.stop_token_ids = end_of_turn_ids(fmt, tokenizer, model)

    # ------------------------------------------------------------------------- the Run's hooks
    def run(self) -> TrainResult:
        return self.runner.train(self)

    def final_model(self) -> nn.Module:
        return self.policy


def end_of_turn_ids(fmt: Any, tokenizer: Any, model: str) -> list[int]:
    """The token ids a sampled response stops at: the chat format's single-token end-of-turn markers, else
    the tokenizer's EOS. `model` names the policy in the error when there is neither."""
    ids = list(fmt.stop_token_ids(tokenizer)) if fmt is not None else []
    if not ids and tokenizer.eos_token_id is not None:
        ids = [int(tokenizer.eos_token_id)]
    if not ids:
        raise ChatsmithError(f"{model}: the chat format has no single-token end-of-turn marker, so responses "
                             f"cannot be cut and scored at their end")
    return ids


def reward_scorer(spec: str, scorer: Any, tokenizer: Any, device: str, cfg: Any) -> Any:
    """`scorer`, or the one `spec` names (`rm:DIR`, `py:module:function`, `world`); a scorer that can skip
    unfinished responses does so when --no-eos-penalty replaces their score anyway."""
    if scorer is None:
        scorer = make_scorer(spec, tokenizer, device, cfg.forward_batch_size)
    if hasattr(scorer, "skip_unfinished"):
        scorer.skip_unfinished = cfg.no_eos_penalty is not None
    return scorer


def load_stage_prompts(cfg: Any, tokenizer: Any, fmt: Any, stage: str) -> list[PromptItem]:
    """cfg.prompts, rendered; prompts that leave no room for cfg.max_new_tokens within cfg.max_len are
    dropped, with a note saying how many."""
    budget = prompt_budget(cfg.max_len, cfg.max_new_tokens)
    prompts, dropped = load_prompts(cfg.prompts, tokenizer, fmt, budget)
    if dropped:
        note(dropped_prompts_line(stage, dropped, budget))
    return prompts


def prompt_batches(num_prompts: int, global_batch: int, seed: int) -> ShardedBatchSource:
    """Batches of prompt indices: one global batch per step, the same order on every rank (rank r takes the
    r-th slice). Every step is a whole batch (an epoch's remainder is dropped): a short one would leave
    ranks empty."""
    return ShardedBatchSource(list(range(num_prompts)), global_batch, collate=list, seed=seed, drop_last=True,
                              rank=0, world_size=1)
