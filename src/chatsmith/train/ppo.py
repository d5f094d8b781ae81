"""RLHF with PPO: make a chat model score higher under a reward model without drifting from where it started.

    chatsmith ppo --policy runs/sft --reward-model runs/rm --prompts data/prompts.jsonl --out runs/ppo
    chatsmith ppo --policy runs/dpo ...   # from a DPO model, as the demo does: it is also the KL anchor
    chatsmith ppo ... --resume            # continue from OUT/checkpoint (bit-identical on CPU)

This is a faithful, readable PPO-for-language-models, following Ziegler et al. (2019), "Fine-Tuning Language
Models from Human Preferences", Stiennon et al. (2020), "Learning to summarize from human feedback", and the
checklist of Huang et al. (2024), "The N+ Implementation Details of RLHF with PPO". All the arithmetic lives
in `rl_functional.py` (pure functions, each with its citation); this file wires the four models together.

Four roles
    policy     pi      the model being trained, initialised from `--policy` (an SFT or DPO model)
    reference  pi_ref  a frozen copy of that starting model (the KL anchor), or `--reference`
    reward     r       a frozen reward model (`chatsmith reward`), scores normalised (mean 0, std 1)
    value      V       a trainable copy of the reward model whose scalar head is read at every token, its head
                       rescaled to the normalised scores' units (`reward_model.fold_normalization_into_head`)
Dropout is off in all four (Huang et al. 2024).
With `--lora-r R` the policy trains LoRA adapters and the reference is the same weights with the adapters
disabled (`train.lora.DisabledAdapterView`, unless --reference names another model). The value model is the
reward model's own weights with adapters of its own and its own trainable copy of the score head (peft's
modules_to_save); the reward is scored with those adapters off, so one copy of the reward model's weights
serves both (with --value-model, or a `py:`/`world` reward, the value model is a separate copy with LoRA).

One PPO step (`--max-steps` of them)
 1. Rollout: `--rollout-batch-size` prompts; one response each from the KV-cache engine at
    `--temperature`; tokens after the end-of-turn are masked; log-probs of pi and pi_ref recomputed from
    logits / temperature (`rollout.py`).
 2. Score: r(prompt, response) at the end-of-turn token; a response with no end-of-turn gets
    `--no-eos-penalty` instead.
 3. Per-token reward: -beta * KL_t (k1 by default, `--kl-estimator`), plus the score on the last token;
    beta fixed or adaptive (`--kl-target`, `--kl-horizon`, Ziegler et al. 2019).
 4. GAE with gamma = 1, lambda = 0.95 on the rollout-time values; advantages whitened over the batch.
 5. `--ppo-epochs` passes over the batch in shuffled minibatches of `--batch-size * --grad-accum`
    episodes: clipped surrogate (0.2) + `--vf-coef` * clipped value loss (0.2), token-averaged over the
    whole minibatch, one optimizer step per minibatch for each of policy and value. A minibatch is run in
    micro-batches of at most `--batch-size` episodes of similar length, each cut to its own longest
    prompt and response (`rollout.plan_micro_batches`). The world's prompts average 26 tokens and the
    longest has 115; grouping cut the update time of the full demo's PPO stage from 82 s to 51 s.
Per step, metrics.jsonl gets: score, kl, beta, entropy, clip_fraction, approx_kl, policy/value loss,
explained_variance, response_length, no_eos_rate and the time of each phase. Every `--sample-every`
steps a table of prompts, responses and scores is printed and appended to OUT/samples.jsonl.

Several processes: `torchrun --nproc-per-node N -m chatsmith ppo ... --rollout-batch-size B` collects one
global batch of N x B episodes per step, rank r the r-th slice (with the random streams its rows have in
the global batch). Advantage whitening, explained variance, the adaptive KL controller and the
token-weighted losses use the statistics of the whole batch, and the gradients of policy and value model
are summed over ranks, so minibatch k of a step is the union of every rank's k-th minibatch. With one
minibatch per epoch, two processes train exactly what one process with 2 x B episodes trains
(tests/test_distributed.py).

Output: OUT is a standard HF chat model directory (the final policy); OUT/value holds the value model (an
HF sequence-classification directory, so `chatsmith rlhf` or a longer run can start from it; with LoRA both
are peft adapter directories);
OUT/checkpoint holds policy + value + both optimizers and schedulers + beta + RNG + data position + step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatsmith.config import arg, validate_config
from chatsmith.errors import ChatsmithError
from chatsmith.model import RL_EMBEDDING_MODES, TRAIN_EMBEDDINGS_HELP, checked_model_source, disable_dropout, hub_where, quiet_transformers, save_model
from chatsmith.adapters import is_adapter_dir
from chatsmith.reward_model import fold_normalization_into_head
from chatsmith.train import rl_functional as F
from chatsmith.train.config import TrainConfig, check_room_for_prompt
from chatsmith.train.devices import autocast_context
from chatsmith.train.lora import AdapterDisabledScorer, apply_lora
from chatsmith.train.optim import build_optimizer, build_scheduler, clip_gradients
from chatsmith.train.parallel import (all_reduce_gradients, all_reduce_sum, enable_activation_checkpointing,
                                      sum_over_ranks)
from chatsmith.train.policy_setup import PolicyStage, load_stage_prompts, prompt_batches, reward_scorer
from chatsmith.train.rollout import (PromptItem, RewardModelScorer, Rollout, apply_no_eos_penalty, check_reward_spec,
                                     collect_rollout, micro_batch_tensors, response_forward, reward_model_path,
                                     rollout_micro_batches, sample_row, value_forward)
from chatsmith.train.run import CheckpointParts, TrainingDiverged, TrainResult
from chatsmith.utils import step_seed

__all__ = ["PPOConfig", "ppo", "PPOTrainer"]


@dataclass
class PPOConfig(TrainConfig):
    policy: str = arg("runs/sft", "SFT model directory: the policy starts here and the frozen reference is a copy.")
    reward_model: str = arg("runs/rm", "Reward model directory (`chatsmith reward`), or a reward function: `world` "
                                       "(the built-in world's judge) or py:MODULE:FUNCTION.")
    reference: str | None = arg(None, "Frozen reference (KL anchor) directory (default: --policy).")
    value_model: str | None = arg(None, "Value model directory (default: initialise from --reward-model, or from "
                                        "--policy when the reward is a function).")
    prompts: str = arg("data/prompts.jsonl", "Prompts (conversations ending with a user turn; any chat format).")
    out: str = arg("runs/ppo", "Output directory: final policy (HF chat model), value/, metrics, samples.")
    template: str | None = arg(None, "Chat format if the policy's tokenizer has none (chatml, llama2, alpaca, .jinja).")
    parallel: str = arg("ddp", "Under torchrun every rank holds the whole policy (and reference); FSDP is for "
                        "the supervised stages.", choices=["ddp"])
    max_steps: int = arg(50, "PPO steps (each = one rollout batch + --ppo-epochs of updates).")
    rollout_batch_size: int = arg(32, "Episodes (prompt + sampled response) per PPO step, per process under torchrun.",
                                  min=1)
    batch_size: int = arg(16, "Most episodes per forward/backward micro-batch in the update (episodes of similar "
                                  "length are grouped, so a micro-batch may hold fewer).")
    grad_accum: int = arg(1, "Micro-batches per optimizer step: a minibatch is batch_size * grad_accum episodes.")
    ppo_epochs: int = arg(4, "Passes over each rollout batch (shuffled minibatches each time).", min=1)
    lr: float = arg(1e-5, "Policy learning rate (AdamW).")
    value_lr: float | None = arg(None, "Value-model learning rate (default: --lr).", min=0, min_exclusive=True)
    warmup_steps: int = arg(0, "Linear warmup, in optimizer steps.")
    min_lr_ratio: float = arg(0.1, "Cosine decay ends at lr * min_lr_ratio at the last optimizer step.")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    train_embeddings: str = arg("special", TRAIN_EMBEDDINGS_HELP, choices=list(RL_EMBEDDING_MODES))
    max_new_tokens: int = arg(48, "Longest response sampled.", min=1)
    temperature: float = arg(0.7, "Sampling temperature; log-probs are computed from logits / temperature.",
                             min=0, min_exclusive=True)
    max_len: int = arg(256, "Longest prompt + response in tokens (prompts longer than max_len - max_new_tokens are skipped).")
    kl_coef: float = arg(0.05, "beta: weight of the per-token KL penalty (initial value when adaptive).", min=0)
    kl_estimator: str = arg("k1", "Per-token KL estimate in the reward (Schulman 2020).", choices=["k1", "k2", "k3"])
    kl_target: float | None = arg(None, "Adaptive beta: target KL per episode in nats (None = fixed beta).",
                                  min=0, min_exclusive=True)
    kl_horizon: int = arg(10000, "Adaptive beta: horizon in episodes (Ziegler et al. 2019).", min=1)
    gamma: float = arg(1.0, "GAE discount.", min=0, max=1)
    lam: float = arg(0.95, "GAE lambda.", min=0, max=1)
    clip_range: float = arg(0.2, "PPO ratio clip epsilon.", min=0, min_exclusive=True)
    clip_range_value: float = arg(0.2, "Value clip: new values stay within this of the rollout-time values.",
                                  min=0, min_exclusive=True)
    vf_coef: float = arg(0.1, "Weight of the value loss.", min=0)
    whiten_rewards: bool = arg(False, "Whiten per-token rewards over the batch (mean kept) before GAE.")
    no_eos_penalty: float | None = arg(-1.0, "Score given to responses that never end their turn (None = keep RM score).")
    forward_batch_size: int = arg(32, "Rows per no-grad forward pass (log-probs, values, scores).", min=1)
    rollout_max_batch: int = arg(0, "Most responses sampled at once: finished ones leave and queued prompts "
                                  "join at the next step (the samples are the same for any value); 0 = the "
                                  "whole step's.", min=0)
    sample_every: int = arg(10, "Print and save a table of sample responses every N steps (0 = off).", min=0)
    num_samples: int = arg(4, "Rows in that table.", min=0)
    save_every: int = arg(25, "Write OUT/checkpoint every N PPO steps (0 = only at the end).")
    log_every: int = arg(1, "Write a metrics row every N PPO steps.")
    save_value: bool = arg(True, "Also save the trained value model in OUT/value.")

    def check_settings(self) -> None:
        """Cross-setting rules (`chatsmith.config.validate_config` calls this)."""
        super().check_settings()
        check_room_for_prompt(self)


class _Pair:
    """Two optimizers (or schedulers) saved and restored as one object by the shared Checkpointer."""

    def __init__(self, policy: Any, value: Any):
        self.policy, self.value = policy, value

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "value": self.value.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.value.load_state_dict(state["value"])


def _check_config(cfg: PPOConfig) -> None:
    """Every setting's bounds (`validate_config`), then how the rollout splits into minibatches."""
    validate_config(cfg)
    minibatch = cfg.batch_size * cfg.grad_accum
    if cfg.rollout_batch_size % minibatch:
        raise ChatsmithError(f"--rollout-batch-size {cfg.rollout_batch_size} must be a multiple of the minibatch "
                             f"--batch-size * --grad-accum = {minibatch}")


def value_source(cfg: "PPOConfig") -> str:
    """Where the value model starts: --value-model, else the reward model's directory, else (a reward
    function: `world`, `py:...`) the policy, whose backbone gets a new scalar head."""
    return cfg.value_model or reward_model_path(cfg.reward_model) or cfg.policy


class PPOTrainer(PolicyStage):
    """Holds the four models and supplies PPO steps to a `chatsmith.train.run.Run` (which owns resume, logging,
    samples, checkpoints and the final save). `ppo(cfg)` is the command; tests and `rlhf` use this too.

    `scorer` and `generate_fn` can be injected (tests use a toy reward); by default the reward model at
    `cfg.reward_model` scores and `chatsmith.generate` samples.
    """

    name = "ppo"
    progress_keys = ("score", "kl")
    throughput = "episodes"

    def __init__(self, cfg: PPOConfig, policy: nn.Module | None = None, tokenizer: Any = None, fmt: Any = None,
                 reference: nn.Module | None = None, value_model: nn.Module | None = None, scorer: Any = None,
                 prompts: list[PromptItem] | None = None, generate_fn: Any = None):
        _check_config(cfg)
        if scorer is None:
            check_reward_spec(cfg.reward_model, "--reward-model")
        # Under torchrun each rank collects --rollout-batch-size episodes of one global batch; whitening,
        # the KL controller and the token-weighted losses use the whole batch's statistics, and the
        # gradients are summed over ranks (see _update), so W processes train what one process with W times
        # the rollout batch trains.
        # The reference is --reference, else the SFT policy itself (with LoRA: the policy's adapters off).
        self.setup_policy(cfg, cfg.policy, cfg.reference or cfg.policy, policy, tokenizer, fmt, reference)
        self.sum_across = sum_over_ranks if self.distributed else None
        scorer = reward_scorer(cfg.reward_model, scorer, self.tokenizer, self.device, cfg)
        self.scorer = scorer
        from_caller = value_model is not None
        if value_model is None and self.lora and cfg.value_model is None and isinstance(scorer, RewardModelScorer):
            # The value model is the reward model's own weights with adapters of its own (and its own copy of
            # the score head); the reward is scored with those adapters off: one copy serves both.
            value_model = apply_lora(scorer.rm.model, cfg, base=scorer.rm.path, task="reward")
            self.scorer = AdapterDisabledScorer(scorer, value_model)
        elif value_model is None:
            value_model = self._load_value_model()
            if self.lora:
                value_model = apply_lora(value_model, cfg, base=value_source(self.cfg), task="reward")
        elif self.lora:
            value_model = apply_lora(value_model, cfg, task="reward")
        if cfg.value_model is None and isinstance(scorer, RewardModelScorer) and not from_caller:
            # Values in the units of the rewards PPO uses: the reward model's normalised scores (of an ensemble,
            # the first member's, whose weights the value model starts from).
            first = getattr(scorer.rm, "members", [scorer.rm])[0]
            fold_normalization_into_head(value_model, first.mean, first.std)
        self.value_model = disable_dropout(value_model.to(self.device))
        if cfg.activation_checkpointing:
            for model in (self.policy, self.value_model):
                enable_activation_checkpointing(model)
        if not self.lora:
            for p in self.value_model.parameters():
                p.requires_grad_(True)
        self.prompts = prompts if prompts is not None else load_stage_prompts(cfg, self.tokenizer, self.fmt, "ppo")
        self.source = prompt_batches(len(self.prompts), cfg.rollout_batch_size * self.world, cfg.seed)
        self.models = nn.ModuleDict({"policy": self.policy, "value": self.value_model})
        value_cfg = dataclasses.replace(cfg, lr=cfg.value_lr if cfg.value_lr is not None else cfg.lr)
        self.minibatches_per_epoch = cfg.rollout_batch_size // (cfg.batch_size * cfg.grad_accum)
        total_optimizer_steps = cfg.max_steps * cfg.ppo_epochs * self.minibatches_per_epoch
        self.optimizer = _Pair(build_optimizer(self.policy, cfg), build_optimizer(self.value_model, value_cfg))
        self.scheduler = _Pair(build_scheduler(self.optimizer.policy, cfg, total_optimizer_steps),
                               build_scheduler(self.optimizer.value, value_cfg, total_optimizer_steps))
        self.kl_ctl = (F.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
                       if cfg.kl_target is not None else F.FixedKLController(cfg.kl_coef))
        self.generate_fn = generate_fn
        self.step = 0
        self.last_samples: tuple | None = None

    # ------------------------------------------------------------------------- setup
    def _load_value_model(self) -> nn.Module:
        """A trainable copy of the reward model (or of --value-model): same backbone, same scalar head."""
        path = value_source(self.cfg)
        from transformers import AutoModelForSequenceClassification

        flag = "--value-model" if self.cfg.value_model else "--reward-model"
        try:
            source, hub = checked_model_source(path)      # a local directory or a Hub id
            if not hub and is_adapter_dir(source):   # a LoRA reward or value model: its base with the adapter merged
                from chatsmith.reward_model import load_reward_model

                return load_reward_model(source, device="cpu", ensemble=False).model
            with quiet_transformers():
                return AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
        except ChatsmithError as exc:
            raise ChatsmithError(f"{flag} {exc}") from None
        except Exception as exc:  # noqa: BLE001 - many library error types; report them as one clear line
            where = hub_where(source) if hub else source
            raise ChatsmithError(f"{flag} {where}: cannot load it as a value model: {exc}") from None

    # ------------------------------------------------------------------------- one PPO step
    def rollout(self) -> tuple[Rollout, list[int]]:
        per_rank = self.cfg.rollout_batch_size
        indices = self.source.next_batch()[self.rank * per_rank:(self.rank + 1) * per_rank]
        prompt_ids = [self.prompts[i].ids for i in indices]
        with autocast_context(self.device, self.amp_dtype):
            rollout = collect_rollout(self.policy, self.reference, self.tokenizer, prompt_ids, indices,
                                      max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                      stop_token_ids=self.stop_token_ids,
                                      seed=step_seed(self.cfg.seed, self.step),
                                      forward_batch_size=self.cfg.forward_batch_size, generate_fn=self.generate_fn,
                                      first_row=self.rank * per_rank, max_batch=self.cfg.rollout_max_batch)
        return rollout, indices

    @torch.no_grad()
    def _values(self, rollout: Rollout) -> torch.Tensor:
        values = torch.zeros(rollout.response_mask.shape, dtype=torch.float32, device=rollout.response_mask.device)
        self.value_model.eval()
        for rows in rollout_micro_batches(rollout, range(rollout.batch_size),
                                          self.cfg.forward_batch_size or rollout.batch_size):
            ids, attention, prompt_len, r = micro_batch_tensors(rollout, rows)
            with autocast_context(self.device, self.amp_dtype):
                values[rows, :r] = value_forward(self.value_model, ids, attention, prompt_len).float()
        self.value_model.train()
        return values * rollout.response_mask

    def train_step(self) -> dict[str, float]:
        """Rollout, score, advantages, then PPO epochs. Returns the step's metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        rollout, indices = self.rollout()
        t1 = time.perf_counter()
        scores = self.scorer(rollout, self.prompts).float()
        raw_mean_score = float(scores.mean())
        scores = apply_no_eos_penalty(scores, rollout.finished, cfg.no_eos_penalty)
        t2 = time.perf_counter()

        mask = rollout.response_mask
        old_logprobs, ref_logprobs = rollout.logprobs, rollout.ref_logprobs
        old_values = self._values(rollout)
        kl = F.kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask        # (b, r)
        beta = self.kl_ctl.value
        rewards, non_score = F.per_token_rewards(scores, kl, mask, beta)
        if cfg.whiten_rewards:
            rewards = F.masked_whiten(rewards, mask, shift_mean=False, sum_across=self.sum_across) * mask
        advantages, returns = F.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = F.masked_whiten(advantages, mask, sum_across=self.sum_across) * mask

        shared_stats, replicated_stats = self._update(rollout, old_logprobs, old_values, advantages, returns)
        t3 = time.perf_counter()

        seq_kl = F.kl_k1(old_logprobs, ref_logprobs).mul(mask).sum(-1)
        lengths = rollout.response_lengths.float()
        # Means over this rank's episodes; every rank holds as many, so their mean over ranks is the
        # global batch's.
        episode_means = {
            "score": float(scores.mean()),
            "score_rm": raw_mean_score,
            "kl": float(seq_kl.mean()),
            "kl_k3": float(F.kl_k3(old_logprobs, ref_logprobs).mul(mask).sum(-1).mean()),
            "non_score_reward": float(non_score.sum(-1).mean()),
            "reward_total": float(rewards.sum(-1).mean()),
            "response_length": float(lengths.mean()),
            "no_eos_rate": float((~rollout.finished).float().mean()),
            "rollout_s": t1 - t0, "generate_s": rollout.timings.get("generate_s", 0.0),
            "score_s": t2 - t1, "update_s": t3 - t2,
        }
        if self.distributed:   # one all-reduce: episode means averaged, token-weighted shares summed
            keys, shared_keys = sorted(episode_means), sorted(shared_stats)
            sums = all_reduce_sum([episode_means[k] for k in keys] + [shared_stats[k] for k in shared_keys],
                                  self.device)
            episode_means = {k: v / self.world for k, v in zip(keys, sums)}
            shared_stats = dict(zip(shared_keys, sums[len(keys):]))
        # Ziegler et al. 2019: the controller sees the batch's mean per-episode KL (k1, summed over tokens).
        self.kl_ctl.update(episode_means["kl"], rollout.batch_size * self.world)
        self.step += 1
        self.last_samples = (rollout, scores, indices)
        return {
            **episode_means,
            "beta": beta,
            "explained_variance": float(F.explained_variance(old_values, returns, mask, sum_across=self.sum_across)),
            "value_mean": float(F.masked_mean(old_values, mask, sum_across=self.sum_across)),
            **shared_stats, **replicated_stats,
            "episodes": rollout.batch_size * self.world,
            "lr": self.optimizer.policy.param_groups[0]["lr"],
        }

    def _update(self, rollout: Rollout, old_logprobs: torch.Tensor, old_values: torch.Tensor,
                advantages: torch.Tensor, returns: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
        """`--ppo-epochs` passes of shuffled minibatches; each minibatch = one optimizer step per model.

        Returns (shared, replicated) statistics, each averaged over the updates: `shared` are this rank's
        shares of token-weighted means (they sum over ranks to the global value), `replicated` (gradient
        norms) are the same on every rank. Under torchrun, minibatch k is the union of every rank's k-th
        minibatch of its own (shuffled) episodes."""
        cfg = self.cfg
        b = rollout.batch_size
        mb_size = cfg.batch_size * cfg.grad_accum
        mask = rollout.response_mask
        sums: dict[str, float] = {}
        norms: dict[str, float] = {}
        n_updates = 0
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, self.step, salt=1 + 7 * self.rank))
        self.policy.train()
        self.value_model.train()
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(b, generator=gen).tolist()
            # Token-level mean over the WHOLE minibatch (all micro-batches, all ranks), not a mean of means.
            minibatch_tokens = sum_over_ranks(torch.stack([mask[order[start:start + mb_size]].sum().float()
                                                           for start in range(0, b, mb_size)]))
            for mb_index, mb_start in enumerate(range(0, b, mb_size)):
                mb_rows = order[mb_start:mb_start + mb_size]
                mb_tokens = float(minibatch_tokens[mb_index].clamp(min=1))
                stats_mb: dict[str, float] = {}
                # Micro-batches of similar lengths, each cut to its own longest prompt and response.
                for rows in rollout_micro_batches(rollout, mb_rows, cfg.batch_size):
                    ids, attention, prompt_len, r = micro_batch_tensors(rollout, rows)
                    m = mask[rows, :r]
                    weight = float(m.sum()) / mb_tokens
                    with autocast_context(self.device, self.amp_dtype):
                        logprobs, entropy = response_forward(self.policy, ids, attention, prompt_len,
                                                             cfg.temperature, with_entropy=True)
                        vpred = value_forward(self.value_model, ids, attention, prompt_len).float()
                    pg_loss, pg_stats = F.policy_loss(logprobs, old_logprobs[rows, :r], advantages[rows, :r], m,
                                                      cfg.clip_range)
                    vf_loss, vf_stats = F.value_loss(vpred, old_values[rows, :r], returns[rows, :r], m,
                                                     cfg.clip_range_value)
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    self.precision.backward(loss * weight)
                    micro = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "loss": loss.detach(),
                             "entropy": F.masked_mean(entropy.detach(), m), **pg_stats, **vf_stats}
                    for k, v in micro.items():
                        stats_mb[k] = stats_mb.get(k, 0.0) + float(v) * weight
                if not math.isfinite(stats_mb["loss"]):
                    raise TrainingDiverged(f"ppo: loss became {stats_mb['loss']} at step {self.step + 1}; "
                                           f"try a lower --lr or a larger --kl-coef")
                # Each rank's loss carries its share of the global minibatch's tokens: the sum over ranks
                # is the gradient of the whole minibatch.
                all_reduce_gradients([*self.policy.parameters(), *self.value_model.parameters()], average=False)
                for opt in (self.optimizer.policy, self.optimizer.value):
                    self.precision.unscale(opt)
                norms["grad_norm"] = norms.get("grad_norm", 0.0) + clip_gradients(self.policy.parameters(),
                                                                                   cfg.grad_clip)
                norms["value_grad_norm"] = norms.get("value_grad_norm", 0.0) + clip_gradients(
                    self.value_model.parameters(), cfg.grad_clip)
                for opt, sched in ((self.optimizer.policy, self.scheduler.policy),
                                   (self.optimizer.value, self.scheduler.value)):
                    self.precision.step(opt)   # fp16: skipped when the scaled gradients overflowed
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                self.precision.update()
                for k, v in stats_mb.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
        n_updates = max(1, n_updates)
        return ({k: v / n_updates for k, v in sums.items()}, {k: v / n_updates for k, v in norms.items()})

    # ------------------------------------------------------------------------- samples table
    def sample_rows(self, n: int) -> list[dict[str, Any]]:
        rollout, scores, indices = self.last_samples
        return [sample_row(self.step, self.prompts[indices[i]], rollout, i, scores[i])
                for i in range(min(n, rollout.batch_size))]

    # ------------------------------------------------------------------------- the Run's hooks
    def checkpoint_parts(self) -> CheckpointParts:
        return CheckpointParts(self.models, self.optimizer, self.scheduler, self.source)

    def extra_state(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(extra["kl_ctl"])

    def save_extras(self, out: Path) -> None:
        """OUT/value: the trained value model (an HF sequence-classification directory)."""
        if not self.cfg.save_value:
            return
        save_model(self.value_model, self.tokenizer, out / "value")   # with LoRA: the value adapter directory


def ppo(cfg: PPOConfig) -> TrainResult:
    """`chatsmith ppo`: train the policy in cfg.policy against cfg.reward_model; see the module docstring."""
    return PPOTrainer(cfg).run()
