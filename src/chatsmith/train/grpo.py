"""GRPO: group relative policy optimisation - RL without a value model (Shao et al. 2024, DeepSeekMath).

    chatsmith grpo --model runs/sft --prompts data/prompts.jsonl --reward world --out runs/grpo
    chatsmith grpo --model runs/sft --prompts data/prompts.jsonl --reward rm:runs/rm --out runs/grpo
    chatsmith grpo --model runs/sft --prompts my_prompts.jsonl --reward py:my_rewards:reward --out runs/grpo

Each step draws `--prompts-per-step` prompts and samples `--num-generations` (G) responses to each with
the KV-cache engine. Every response gets one reward - the world's programmatic judge (`world`, a
verifiable reward), a reward model (`rm:PATH`) or your function (`py:module:function`, called as
`f(messages, response, row) -> float`; see `chatsmith.eval.judges`) - and its advantage is its reward
minus the mean of its group, over the group's std (`rl_functional.group_advantages`): the group is the
baseline, so no value model is needed. Every token of a response shares its advantage. The loss is PPO's
clipped surrogate (0.2) plus beta * k3-KL to the frozen reference (`rl_functional.grpo_loss`, Shao et al. eq. 3-4).
`--num-iterations` updates are made per batch (1 = on-policy: the "old" log-probs are the current ones
and the ratio is exactly 1, as in TRL's GRPOTrainer with num_iterations=1).

The G responses of a group share their prompt, and chatsmith computes it once: the engine prefills each
distinct prompt once and copies its KV cache to the group's rows, and the reference and policy forward
passes (and the policy's backward) run the prompt once per group, then the responses against its cache
(`response_logprobs.response_forward`; same log-probs and gradients, `--no-share-prompt` turns it off). The
saving grows with prompt length and G.

Metrics per step: reward (mean, std, per-group std), kl, clip_fraction, entropy, response length, the
time of rollout / scoring / update and episodes/s. Checkpoints and `--resume` as every stage; OUT is a
standard HF chat model directory. With `--lora-r R` the policy trains LoRA adapters, the reference is the
same weights with the adapters disabled (no second copy), and OUT is a peft adapter directory.

Several processes: `torchrun --nproc-per-node N -m chatsmith grpo ... --prompts-per-step P` draws one
global batch of N x P prompts per step; rank r samples the r-th slice with the random streams its rows
have in the global batch, and the gradients are averaged over ranks before each optimizer step. Two
processes train exactly what one process with N x P prompts per step trains (tests/test_distributed.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chatsmith.config import arg, validate_config
from chatsmith.model import RL_EMBEDDING_MODES, TRAIN_EMBEDDINGS_HELP, set_training
from chatsmith.train import rl_functional as F
from chatsmith.train.config import TrainConfig, check_room_for_prompt
from chatsmith.train.devices import autocast_context
from chatsmith.train.optim import build_optimizer, build_scheduler, clip_gradients
from chatsmith.train.parallel import all_reduce_gradients, all_reduce_sum, enable_activation_checkpointing
from chatsmith.train.policy_setup import PolicyStage, load_stage_prompts, prompt_batches, reward_scorer
from chatsmith.train.rollout import (PromptItem, Rollout, apply_no_eos_penalty, check_reward_spec, collect_rollout,
                                     micro_batch_tensors, response_forward, rollout_micro_batches, sample_row)
from chatsmith.train.run import CheckpointParts, TrainingDiverged, TrainResult
from chatsmith.utils import step_seed

__all__ = ["GRPOConfig", "grpo", "GRPOTrainer"]


@dataclass
class GRPOConfig(TrainConfig):
    model: str = arg("runs/sft", "The chat model to start from, SFT or DPO (the policy starts here; the "
                                 "reference is a frozen copy).")
    prompts: str = arg("data/prompts.jsonl", "Prompts (conversations ending with a user turn).")
    reward: str = arg("world", "Reward: 'world' (the built-in world's judge; prompts need category + expected), "
                      "'rm:PATH' (a reward model from `chatsmith reward`) or py:MODULE:FUNCTION (your function "
                      "(messages, response, row) -> float; row = the prompt row's other fields).")
    out: str = arg("runs/grpo", "Output directory: final policy (HF chat model), metrics, samples, checkpoint.")
    template: str | None = arg(None, "Chat format if the model's tokenizer has none.")
    parallel: str = arg("ddp", "Under torchrun every rank holds the whole policy (and reference); FSDP is for "
                        "the supervised stages.", choices=["ddp"])
    max_steps: int = arg(50, "GRPO steps (each = one batch of groups + --num-iterations updates).")
    prompts_per_step: int = arg(4, "Prompts (groups) per step, per process under torchrun.", min=1)
    num_generations: int = arg(4, "G: responses sampled per prompt (the group).", min=2)
    num_iterations: int = arg(1, "Updates per batch (mu in Shao et al.); > 1 reuses the samples off-policy.", min=1)
    batch_size: int = arg(16, "Most episodes per forward/backward micro-batch in the update (episodes of similar "
                                  "length are grouped, so a micro-batch may hold fewer).")
    lr: float = arg(1e-5, "Peak learning rate (AdamW).")
    warmup_steps: int = arg(0, "Linear warmup steps.")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    train_embeddings: str = arg("special", TRAIN_EMBEDDINGS_HELP, choices=list(RL_EMBEDDING_MODES))
    max_new_tokens: int = arg(32, "Longest response sampled.", min=1)
    temperature: float = arg(1.0, "Sampling temperature (log-probs use logits / temperature).",
                             min=0, min_exclusive=True)
    max_len: int = arg(256, "Longest prompt + response (longer prompts are skipped).")
    beta: float = arg(0.04, "Weight of the k3 KL to the reference in the loss (0 = no reference model).", min=0)
    clip_range: float = arg(0.2, "Ratio clip epsilon.", min=0, min_exclusive=True)
    scale_rewards: bool = arg(True, "Divide group-centred rewards by the group std (off = Dr. GRPO).")
    loss_type: str = arg("grpo", "Token aggregation: 'grpo' (mean per response, then over responses) or "
                         "'token' (mean over all tokens).", choices=["grpo", "token"])
    no_eos_penalty: float | None = arg(None, "Reward given to responses that never end their turn (None = keep).")
    forward_batch_size: int = arg(32, "Rows per no-grad forward pass.", min=1)
    rollout_max_batch: int = arg(0, "Most responses sampled at once: finished ones leave and queued prompts "
                                  "join at the next step (the samples are the same for any value); 0 = the "
                                  "whole step's.", min=0)
    share_prompt: bool = arg(True, "Compute each group's prompt once in the forward and backward passes (its KV "
                             "cache is copied to the G responses); the same log-probs and gradients, less work.")
    sample_every: int = arg(10, "Print and save a table of sample responses every N steps (0 = off).", min=0)
    num_samples: int = arg(4, "Rows in that table.", min=0)
    save_every: int = arg(25, "Write OUT/checkpoint every N steps (0 = only at the end).")
    log_every: int = arg(1, "Write a metrics row every N steps.")
    entropy: bool = arg(True, "Log the policy's entropy (computed from the update's logits).")

    def check_settings(self) -> None:
        """Cross-setting rules (`chatsmith.config.validate_config` calls this)."""
        super().check_settings()
        check_room_for_prompt(self)


class GRPOTrainer(PolicyStage):
    """Policy + (optional) frozen reference + a reward function; supplies GRPO steps to a
    `chatsmith.train.run.Run` (which owns resume, logging, samples, checkpoints and the final save).
    `grpo(cfg)` is the command."""

    name = "grpo"
    progress_keys = ("reward", "kl")
    throughput = "episodes"

    def __init__(self, cfg: GRPOConfig, policy: nn.Module | None = None, tokenizer: Any = None, fmt: Any = None,
                 reference: nn.Module | None = None, scorer: Any = None, prompts: list[PromptItem] | None = None,
                 generate_fn: Any = None):
        validate_config(cfg)              # every setting, before any model is loaded
        if scorer is None:
            check_reward_spec(cfg.reward, "--reward")
        # Under torchrun each rank samples --prompts-per-step prompts of one global batch and the gradients
        # are averaged over ranks before every optimizer step (parallel.all_reduce_gradients).
        # The reference is the starting model itself (with LoRA: the policy's adapters off); beta 0 needs none.
        self.setup_policy(cfg, cfg.model, cfg.model if cfg.beta != 0.0 else None, policy, tokenizer, fmt, reference)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(self.policy)
        self.scorer = reward_scorer(cfg.reward, scorer, self.tokenizer, self.device, cfg)
        self.prompts = prompts if prompts is not None else load_stage_prompts(cfg, self.tokenizer, self.fmt, "grpo")
        self.source = prompt_batches(len(self.prompts), cfg.prompts_per_step * self.world, cfg.seed)
        self.optimizer = build_optimizer(self.policy, cfg, fused=True)
        self.scheduler = build_scheduler(self.optimizer, cfg, cfg.max_steps * cfg.num_iterations)
        self.generate_fn = generate_fn
        self.step = 0
        self.last_samples: tuple | None = None

    # ------------------------------------------------------------------------- one step
    def rollout(self) -> Rollout:
        cfg = self.cfg
        per_rank = cfg.prompts_per_step
        groups = self.source.next_batch()[self.rank * per_rank:(self.rank + 1) * per_rank]
        # G consecutive copies of each prompt: rows [g*G, (g+1)*G) form group g.
        index = [i for i in groups for _ in range(cfg.num_generations)]
        with autocast_context(self.device, self.amp_dtype):
            return collect_rollout(self.policy, self.reference if cfg.beta != 0.0 else None, self.tokenizer,
                                   [self.prompts[i].ids for i in index], index,
                                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   stop_token_ids=self.stop_token_ids, seed=step_seed(cfg.seed, self.step),
                                   forward_batch_size=cfg.forward_batch_size,
                                   need_policy_logprobs=cfg.num_iterations > 1, generate_fn=self.generate_fn,
                                   first_row=self.rank * len(index), share_prompt=cfg.share_prompt,
                                   max_batch=cfg.rollout_max_batch)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        rollout = self.rollout()
        t1 = time.perf_counter()
        rewards = self.scorer(rollout, self.prompts).float()
        rewards = apply_no_eos_penalty(rewards, rollout.finished, cfg.no_eos_penalty)
        advantages = F.group_advantages(rewards, cfg.num_generations, scale=cfg.scale_rewards)
        t2 = time.perf_counter()
        stats = self._update(rollout, advantages)
        t3 = time.perf_counter()
        self.step += 1
        self.last_samples = (rollout, rewards)
        grouped = rewards.view(-1, cfg.num_generations)
        metrics = {
            "reward": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "group_reward_std": float(grouped.std(-1).mean()),
            "zero_std_groups": float((grouped.std(-1) == 0).float().mean()),
            "response_length": float(rollout.response_lengths.float().mean()),
            "no_eos_rate": float((~rollout.finished).float().mean()),
            **stats,
            "rollout_s": t1 - t0, "generate_s": rollout.timings.get("generate_s", 0.0), "score_s": t2 - t1,
            "update_s": t3 - t2, "episodes": rollout.batch_size,
            "episodes_per_s": rollout.batch_size / max(1e-9, t3 - t0),
        }
        if self.distributed:   # the logged values describe the global batch: means over ranks, summed counts
            metrics = self._mean_stats(metrics)
            metrics["episodes"] *= self.world
            metrics["episodes_per_s"] *= self.world
        return metrics

    def _update(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, float]:
        """`--num-iterations` optimizer steps, each over the whole batch in micro-batches."""
        cfg = self.cfg
        b = rollout.batch_size
        mask = rollout.response_mask
        total_tokens = float(mask.sum().clamp(min=1))
        sums: dict[str, float] = {}
        set_training(self.policy, True)
        micro_batches = rollout_micro_batches(rollout, range(b), cfg.batch_size)
        for _ in range(cfg.num_iterations):
            step_stats: dict[str, float] = {}
            for rows in micro_batches:
                ids, attention, prompt_len, r = micro_batch_tensors(rollout, rows)
                m = mask[rows, :r]
                # Weights that make the sum over micro-batches equal the loss of the whole batch.
                weight = (m.shape[0] / b) if cfg.loss_type == "grpo" else float(m.sum()) / total_tokens
                with autocast_context(self.device, self.amp_dtype):
                    logprobs, entropy = response_forward(self.policy, ids, attention, prompt_len, cfg.temperature,
                                                         with_entropy=cfg.entropy, share_prompt=cfg.share_prompt)
                old = rollout.logprobs[rows, :r] if rollout.logprobs is not None else logprobs.detach()
                ref = rollout.ref_logprobs[rows, :r] if rollout.ref_logprobs is not None else None
                loss, stats = F.grpo_loss(logprobs, old, ref, advantages[rows], m, cfg.clip_range, cfg.beta,
                                          cfg.loss_type)
                self.precision.backward(loss * weight)
                stats = {"loss": loss.detach(), **stats}
                if entropy is not None:
                    stats["entropy"] = F.masked_mean(entropy.detach(), m)
                for k, v in stats.items():
                    step_stats[k] = step_stats.get(k, 0.0) + float(v) * weight
            if not math.isfinite(step_stats["loss"]):
                raise TrainingDiverged(f"grpo: loss became {step_stats['loss']} at step {self.step + 1}; "
                                       f"try a lower --lr")
            # Every rank holds the same number of responses, so the mean over ranks of their per-response
            # mean gradients is the gradient of the global batch.
            all_reduce_gradients(self.policy.parameters(), average=True)
            self.precision.unscale(self.optimizer)
            step_stats["grad_norm"] = clip_gradients(self.policy.parameters(), cfg.grad_clip)
            step_stats["lr"] = self.optimizer.param_groups[0]["lr"]
            self.precision.step(self.optimizer)   # fp16: skipped when the scaled gradients overflowed
            self.precision.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            for k, v in step_stats.items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: v / cfg.num_iterations for k, v in sums.items()}

    # ------------------------------------------------------------------------- multi-process
    def _mean_stats(self, stats: dict[str, float]) -> dict[str, float]:
        keys = sorted(stats)
        sums = all_reduce_sum([float(stats[k]) for k in keys], self.device)
        return {k: v / self.world for k, v in zip(keys, sums)}

    # ------------------------------------------------------------------------- samples table
    def sample_rows(self, n: int) -> list[dict[str, Any]]:
        rollout, rewards = self.last_samples
        # One response from each of the first groups, so the table shows different prompts.
        return [sample_row(self.step, self.prompts[rollout.prompt_index[i]], rollout, i, rewards[i])
                for i in list(range(0, rollout.batch_size, self.cfg.num_generations))[:n]]

    # ------------------------------------------------------------------------- the Run's hook
    def checkpoint_parts(self) -> CheckpointParts:
        return CheckpointParts(self.policy, self.optimizer, self.scheduler, self.source)


def grpo(cfg: GRPOConfig) -> TrainResult:
    """`chatsmith grpo`: see the module docstring."""
    return GRPOTrainer(cfg).run()
