"""Iterated RLHF: sample, collect comparisons, retrain the reward model, run PPO again - N rounds.

    chatsmith rlhf --policy runs/sft --prompts data/prompts.jsonl --preferences data/preferences.jsonl \\
                   --rounds 2 --out runs/rlhf
    chatsmith rlhf ... --judge py:my_rewards:score                  # your scoring function as the labeler
    chatsmith rlhf ... --labeler file --labels my_labels.jsonl     # human labels instead of the judge
    chatsmith rlhf ... --labeler human --feedback runs/feedback.db # people judge pairs in the web page

Round k (1-based), all of it under OUT/round_k/:
 1. Sample `--samples-per-prompt` (K) responses to each of `--prompts-per-round` prompts from the current
    policy (in round 1 the SFT model, or `--start-policy`: a PPO run made earlier, to go on from it; the
    previous round's PPO policy after that) -> `samples.jsonl`.
 2. A labeler ranks each prompt's responses, best first:
    - `judge` (default): `--judge`, a reward function `(messages, response, row) -> float` (see
      `chatsmith.eval.judges`) ranks them by score: by default `world`, the built-in world's judge, a
      simulated human who checks facts, turn endings, refusals, rudeness...; or `py:module:function`.
      Responses it scores equal are collapsed to one (a tie is no comparison), and a prompt with fewer
      than 2 distinct outcomes gives no comparison.
    - `file`: a JSONL of human labels (`--labels`), rows in any preference format (`prompt` + `chosen`/
      `rejected`, or `ranked`, or `responses` + `ranking`); rows with a `round` field are used in that
      round only, rows without one in every round. Each round still writes `samples.jsonl` as
      `{"prompt", "responses", "ranking": []}` rows, ready for people to fill in and feed back.
    - `human`: pairs of the samples are queued in the feedback database (`--feedback`), the command stops
      with a message naming the page to judge them in (`chatsmith serve ... --feedback DB`, label mode)
      and the count; the same command run again once they are judged continues the round
      (`chatsmith.train.human_labels`).
 3. The comparisons are added to the preference data so far (`--preferences` plus all earlier rounds):
    `preferences.jsonl` (the reward model trains on all of it, InstructGPT-style K-way rankings).
 4. A reward model is retrained from the SFT model on that file (`chatsmith reward`) -> `rm/`.
 5. PPO runs from the current policy against the new reward model, the KL anchored to the SFT model
    (`--kl-anchor sft`) or to the round's starting policy (`current`) -> `ppo/`.
Per-round metrics (comparisons added, labeler score of the samples, reward-model held-out accuracy, PPO's
final score and KL) go to OUT/metrics.jsonl. A finished round leaves `round_k/done.json`; `--resume` skips
finished rounds (and resumes an interrupted reward-model or PPO run inside a round). OUT itself ends as
the final policy: a standard HF chat model directory.

Several processes: `torchrun --nproc-per-node N -m chatsmith rlhf ...`. Each rank samples a contiguous
slice of the round's prompts, every row with the random stream it has in the whole round (so the samples
are those of one process); the samples are gathered, every rank labels all of them (the judge is
deterministic) and rank 0 writes the files. The reward model and PPO then train on all ranks as
`chatsmith reward` and `chatsmith ppo` do under torchrun: their batch settings (`--rm-batch-size`,
`rollout_batch_size` in `--ppo-config`) count per rank.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatsmith.config import (SEED_MAX, arg, canonical_settings, config_from_dict, load_yaml_config, save_config,
                              validate_config)
from chatsmith.data.rules import prompt_budget
from chatsmith.errors import ChatsmithError, DataError
from chatsmith.train.config import check_room_for_prompt
from chatsmith.train.devices import DTYPES
from chatsmith.train.human_labels import PENDING_FILE, LabelsPending, judged_comparisons, queue_round, waiting_rounds
from chatsmith.train.outdir import claim_out_dir
from chatsmith.train.lora import (LORA_ALPHA_HELP, LORA_DROPOUT_HELP, LORA_R_HELP, LORA_TARGETS_HELP,
                                  check_lora_settings)
from chatsmith.train.ppo import PPOConfig, PPOTrainer
from chatsmith.eval.judges import resolve_reward
from chatsmith.train.rollout import FunctionScorer, PromptItem, collect_rollout, load_policy, load_prompts
from chatsmith.utils import (MetricsLogger, atomic_write_text, barrier, init_distributed, is_main_process, note,
                             rank, read_jsonl, resolve_device, set_seed, step_seed, world_size)

__all__ = ["RLHFConfig", "rlhf", "rank_with_judge", "RoundResult"]


@dataclass
class RLHFConfig:
    policy: str = arg("runs/sft", "SFT model: round 1's policy, the reward models' initialisation, the KL anchor.")
    start_policy: str | None = arg(None, "Round 1's policy if not --policy: a PPO run made earlier (e.g. by "
                                   "`chatsmith ppo`), so the loop goes on from it. --policy stays the reward "
                                   "models' initialisation and the KL anchor.")
    prompts: str = arg("data/prompts.jsonl", "Prompts to sample (with --judge world: world rows with category + "
                                             "expected).")
    preferences: str | None = arg(None, "Initial preference data (the comparisons collected so far).")
    out: str = arg("runs/rlhf", "Output directory: round_k/ subfolders, metrics.jsonl, final policy.")
    rounds: int = arg(2, "Number of sample -> label -> reward model -> PPO rounds.", min=1)
    labeler: str = arg("judge", "Who ranks the samples: --judge (a scoring function; 'world' is an older name "
                                "for it), a label file (--labels) or people in the web page (human, --feedback).",
                       choices=["judge", "world", "file", "human"])
    judge: str = arg("world", "The labeler's scoring function: 'world' (the built-in world's judge, a simulated "
                              "human) or py:MODULE:FUNCTION, (messages, response, row) -> float.")
    labels: str | None = arg(None, "JSONL of human comparisons for --labeler file (a `round` field selects the round).")
    feedback: str | None = arg(None, "For --labeler human: the SQLite database pairs are queued in and people's "
                                     "judgments read from (what `chatsmith serve --feedback DB` writes).")
    samples_per_prompt: int = arg(4, "K: responses sampled per prompt for labelling.", min=2)
    prompts_per_round: int = arg(64, "Prompts sampled (and labelled) per round.", min=1)
    temperature: float = arg(1.0, "Sampling temperature for the labelling samples.", min=0, min_exclusive=True)
    max_new_tokens: int = arg(48, "Longest sampled response.", min=1)
    rollout_max_batch: int = arg(0, "Most responses sampled at once: finished ones leave and queued prompts "
                                  "join at the next step (the samples are the same for any value); 0 = the "
                                  "whole round's. Also the PPO rounds' setting.", min=0)
    max_len: int = arg(256, "Longest prompt + response in tokens.", min=2)
    kl_anchor: str = arg("sft", "PPO's reference: the SFT model (sft) or the round's starting policy (current).",
                         choices=["sft", "current"])
    rm_steps: int = arg(0, "Reward-model optimizer steps per round (0 = --rm-epochs over the data).", min=0)
    rm_epochs: float = arg(1.0, "Reward-model passes over the preference data per round.", min=0, min_exclusive=True)
    rm_lr: float = arg(1e-4, "Reward-model learning rate.", min=0, min_exclusive=True)
    rm_batch_size: int = arg(16, "Reward-model batch size.", min=1)
    rm_config: str | None = arg(None, "YAML of further `chatsmith reward` settings for every round.")
    ppo_steps: int = arg(20, "PPO steps per round.", min=1)
    ppo_lr: float = arg(1e-5, "PPO policy learning rate.", min=0, min_exclusive=True)
    ppo_config: str | None = arg(None, "YAML of further `chatsmith ppo` settings for every round.")
    lora_r: int = arg(0, LORA_R_HELP + " Applies to every round's reward model and PPO.", min=0)
    lora_alpha: float | None = arg(None, LORA_ALPHA_HELP, min=0, min_exclusive=True)
    lora_dropout: float = arg(0.0, LORA_DROPOUT_HELP, min=0, max=1, max_exclusive=True)
    lora_targets: str = arg("all-linear", LORA_TARGETS_HELP)
    seed: int = arg(0, "Random seed.", min=0, max=SEED_MAX)
    resume: bool = arg(False, "Skip finished rounds and resume an interrupted one.")
    overwrite: bool = arg(False, "Run in a non-empty --out that is not an rlhf run (chatsmith replaces its own "
                          "files there; other files are left alone).")
    device: str = arg("auto", "cpu, cuda, mps or auto.")
    dtype: str = arg("auto", "Compute dtype of the reward-model and PPO training (see `chatsmith sft --help`): "
                     "auto, bf16, fp16 (CUDA only) or fp32.", choices=list(DTYPES))
    dry_run: bool = arg(False, "Print the parameters and the estimated peak memory per device of a round's PPO "
                        "(policy, value model, reference, reward model), then exit without writing --out.")
    progress: bool = arg(True, "Progress output.")

    def check_settings(self) -> None:
        """Cross-setting rules (`chatsmith.config.validate_config` calls this)."""
        check_room_for_prompt(self)
        check_lora_settings(self)


@dataclass
class RoundResult:
    round: int
    policy: str
    reward_model: str
    metrics: dict[str, float]


# ----------------------------------------------------------------------------- labelling

def rank_with_judge(prompt: PromptItem, responses: list[str], finished: list[bool],
                    scorer: FunctionScorer) -> tuple[list[str], list[float]]:
    """Responses best first by the judge's score, one per distinct score (ties give no comparison).

    Returns `(ranked responses, their scores)`; fewer than 2 entries = no usable comparison. Identical
    texts are merged first (a preference between two copies of the same reply carries no signal).
    """
    best_by_score: dict[float, str] = {}
    seen: set[str] = set()
    for text, done in zip(responses, finished):
        if text in seen or not text.strip():
            continue
        seen.add(text)
        s = scorer.score_one(prompt, text, done)
        best_by_score.setdefault(s, text)   # the first response with this score represents it
    ordered = sorted(best_by_score.items(), key=lambda kv: -kv[0])
    return [t for _, t in ordered], [s for s, _ in ordered]


def _load_label_rows(path: str, round_index: int) -> list[dict[str, Any]]:
    """Rows of the human label file that belong to this round (validated by the shared loader)."""
    from chatsmith.data.formats import load_examples

    if not Path(path).is_file():
        raise ChatsmithError(f"--labels {path}: file not found")
    result = load_examples(path, kind="preference")
    rows = []
    for ex in result.examples:
        wanted = ex.meta.get("round")
        if wanted is not None and not isinstance(wanted, int):
            raise DataError(f"{ex.origin}: field 'round' should be a round number (1, 2, ...), got {wanted!r}")
        if wanted is None or wanted == round_index:
            rows.append({"prompt": ex.prompt, "ranked": list(ex.responses), "origin": ex.origin})
    return rows


# ----------------------------------------------------------------------------- the loop

class _RLHF:
    def __init__(self, cfg: RLHFConfig):
        checks = [(cfg.rounds >= 1, f"--rounds must be >= 1, got {cfg.rounds}"),
                  (cfg.samples_per_prompt >= 2, f"--samples-per-prompt must be >= 2 to compare, got "
                                                f"{cfg.samples_per_prompt}"),
                  (cfg.prompts_per_round >= 1, "--prompts-per-round must be >= 1"),
                  (cfg.labeler != "file" or cfg.labels, "--labeler file needs --labels FILE"),
                  (cfg.labeler != "human" or cfg.feedback, "--labeler human needs --feedback DB (the database "
                                                           "`chatsmith serve --feedback DB` writes judgments to)"),
                  (cfg.temperature > 0, "--temperature must be > 0")]
        for ok, message in checks:
            if not ok:
                raise ChatsmithError(message)
        waiting = waiting_rounds(cfg.out) if cfg.labeler == "human" and not cfg.overwrite else []
        if waiting and not cfg.resume:
            # the round stopped for people's judgments: this run is its continuation
            note(f"rlhf: {waiting[0].name} was waiting for judgments in {cfg.feedback}; continuing the run in {cfg.out}")
            cfg = dataclasses.replace(cfg, resume=True)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.claim = claim_out_dir(cfg, "rlhf")      # not an input model, an rlhf run or --overwrite, locked
        self.distributed = init_distributed(cfg.device)
        self.rank, self.world = (rank(), world_size()) if self.distributed else (0, 1)
        if cfg.labeler == "human" and self.world > 1:
            raise ChatsmithError("--labeler human runs in one process (people label the pairs, not ranks); "
                                 "run it without torchrun")
        self.logger = MetricsLogger(self.out, stage="rlhf")
        self.rm_overrides = load_yaml_config(cfg.rm_config) if cfg.rm_config else {}
        self.ppo_overrides = load_yaml_config(cfg.ppo_config) if cfg.ppo_config else {}
        self.judge = (FunctionScorer(resolve_reward(cfg.judge, "--judge"), cfg.judge)
                      if cfg.labeler not in ("file", "human") else None)

    def round_dir(self, k: int) -> Path:
        return self.out / f"round_{k}"

    def run(self) -> list[RoundResult]:
        try:
            return self.run_rounds()
        finally:
            self.claim.release()

    def run_rounds(self) -> list[RoundResult]:
        cfg = self.cfg
        if is_main_process():
            if not cfg.resume:
                self.logger.path.unlink(missing_ok=True)
            save_config(cfg, self.out / "rlhf_config.yaml")
        results: list[RoundResult] = []
        policy = cfg.start_policy or cfg.policy
        for k in range(1, cfg.rounds + 1):
            done = self.round_dir(k) / "done.json"
            if cfg.resume and done.is_file():
                info = json.loads(done.read_text())
                results.append(RoundResult(k, info["policy"], info["reward_model"], info["metrics"]))
                policy = info["policy"]
                note(f"rlhf: round {k} already finished, skipping (policy {policy})")
                continue
            results.append(self.run_round(k, policy))
            policy = results[-1].policy
        self._export_final(Path(policy))
        return results

    def run_round(self, k: int, policy_dir: str) -> RoundResult:
        cfg = self.cfg
        rdir = self.round_dir(k)
        rdir.mkdir(parents=True, exist_ok=True)
        note(f"rlhf: round {k}/{cfg.rounds}: sampling {cfg.samples_per_prompt} responses to "
              f"{cfg.prompts_per_round} prompts from {policy_dir}")
        sample_rows, new_comparisons, label_score = self.sample_and_label(k, policy_dir)
        # Preference data so far = initial file + every earlier round's new comparisons + this round's.
        previous = self._previous_preferences(k)
        rows = previous + new_comparisons
        if not rows:
            raise ChatsmithError(f"rlhf round {k}: no comparisons to train a reward model on (every prompt's "
                                 f"samples were judged equal); sample more (--samples-per-prompt, --temperature)")
        if is_main_process():   # every rank holds the same rows; one writes them
            for name, part in (("samples", sample_rows), ("new_preferences", new_comparisons), ("preferences", rows)):
                atomic_write_text(rdir / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                   for r in part))
        barrier()   # the reward model reads preferences.jsonl on every rank

        rm_metrics = self.train_reward_model(k, rdir)
        ppo_result = self.run_ppo(k, policy_dir, rdir)
        metrics = {"round": k, "comparisons_added": len(new_comparisons), "comparisons_total": len(rows),
                   "label_score": label_score,
                   "rm_eval_accuracy": rm_metrics.get("eval_accuracy"),
                   "rm_eval_margin": rm_metrics.get("eval_margin"),
                   **{f"ppo_{key}": ppo_result.metrics.get(key) for key in ("score", "kl", "beta", "response_length",
                                                                          "no_eos_rate")}}
        metrics = {key: v for key, v in metrics.items() if v is not None}
        self.logger.log(k, **metrics)
        result = RoundResult(k, str(rdir / "ppo"), str(rdir / "rm"), metrics)
        if is_main_process():
            atomic_write_text(rdir / "done.json", json.dumps(dataclasses.asdict(result), indent=1) + "\n")
            (rdir / PENDING_FILE).unlink(missing_ok=True)
        return result

    def sample(self, k: int, policy_dir: str) -> tuple[list[PromptItem], list[int], list[str], list[bool]]:
        """K samples per chosen prompt from the current policy: (prompts, chosen indices, texts, finished),
        the texts and finished flags K per chosen prompt in order (gathered from every rank)."""
        cfg = self.cfg
        set_seed(cfg.seed + k)
        policy, tokenizer, fmt = load_policy(policy_dir, self.device)
        prompts, _ = load_prompts(cfg.prompts, tokenizer, fmt, prompt_budget(cfg.max_len, cfg.max_new_tokens))
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, k, salt=2))
        chosen = torch.randperm(len(prompts), generator=gen)[:cfg.prompts_per_round].tolist()
        if len(chosen) < self.world:
            raise ChatsmithError(f"rlhf: {len(chosen)} prompts per round cannot be split over {self.world} "
                                 f"processes; raise --prompts-per-round or use fewer processes")
        K = cfg.samples_per_prompt
        # This rank's contiguous slice of the prompts; its rows keep their place in the round's random streams.
        lo, hi = self.rank * len(chosen) // self.world, (self.rank + 1) * len(chosen) // self.world
        index = [i for i in chosen[lo:hi] for _ in range(K)]
        stop = list(fmt.stop_token_ids(tokenizer)) or [int(tokenizer.eos_token_id)]
        rollout = collect_rollout(policy, None, tokenizer, [prompts[i].ids for i in index], index,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  stop_token_ids=stop, seed=step_seed(cfg.seed, k, salt=3),
                                  need_policy_logprobs=False, first_row=lo * K, max_batch=cfg.rollout_max_batch)
        del policy
        texts_all, finished_all = rollout.texts, rollout.finished.tolist()
        if self.distributed:
            parts: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(parts, (texts_all, finished_all))
            texts_all = [t for part in parts for t in part[0]]
            finished_all = [f for part in parts for f in part[1]]
        return prompts, chosen, texts_all, finished_all

    def sample_and_label(self, k: int, policy_dir: str) -> tuple[list[dict], list[dict], float | None]:
        """K samples per prompt from the current policy; comparisons from the labeler."""
        cfg = self.cfg
        if cfg.labeler == "human":
            return self.human_labels(k, policy_dir)
        K = cfg.samples_per_prompt
        prompts, chosen, texts_all, finished_all = self.sample(k, policy_dir)
        sample_rows, comparisons, judged = [], [], []
        for g, prompt_idx in enumerate(chosen):
            prompt = prompts[prompt_idx]
            texts = texts_all[g * K:(g + 1) * K]
            finished = finished_all[g * K:(g + 1) * K]
            sample_rows.append({"round": k, "prompt": prompt.messages, "responses": texts, "finished": finished,
                                "ranking": []})
            if self.judge is not None:
                ranked, scores = rank_with_judge(prompt, texts, finished, self.judge)
                judged.extend(self.judge.score_one(prompt, t, f) for t, f in zip(texts, finished))
                if len(ranked) >= 2:
                    comparisons.append({"prompt": prompt.messages, "ranked": ranked, "round": k,
                                        "labeler": cfg.judge})
        if self.judge is None:
            comparisons = [{"prompt": r["prompt"], "ranked": r["ranked"], "round": k, "labeler": "human"}
                           for r in _load_label_rows(cfg.labels, k)]
            if not comparisons:
                raise ChatsmithError(f"--labels {cfg.labels}: no comparisons for round {k}; rank the responses in "
                                     f"{self.round_dir(k) / 'samples.jsonl'} (fill 'ranking' with indices, best "
                                     f"first), add them to the file with \"round\": {k}, and rerun with --resume")
        return sample_rows, comparisons, (sum(judged) / len(judged) if judged else None)

    def human_labels(self, k: int, policy_dir: str) -> tuple[list[dict], list[dict], None]:
        """The round's samples and people's comparisons of them; raises `LabelsPending` (after queueing the
        pairs, the first time) while any pair waits for a judgment."""
        from chatsmith.serve.feedback import FeedbackStore

        cfg, rdir = self.cfg, self.round_dir(k)
        store = FeedbackStore(cfg.feedback)
        try:
            marker = rdir / PENDING_FILE
            if marker.is_file():
                batch = json.loads(marker.read_text())["batch"]
                sample_rows = read_jsonl(rdir / "samples.jsonl")
            else:
                prompts, chosen, texts, finished = self.sample(k, policy_dir)
                K = cfg.samples_per_prompt
                sample_rows = [{"round": k, "prompt": prompts[i].messages, "responses": texts[g * K:(g + 1) * K],
                                "finished": finished[g * K:(g + 1) * K], "ranking": []} for g, i in enumerate(chosen)]
                atomic_write_text(rdir / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                  for r in sample_rows))
                batch = queue_round(store, rdir, sample_rows, policy_dir)
            comparisons, pending, total = judged_comparisons(store, batch, k)
        finally:
            store.close()
        if pending:
            raise LabelsPending(k, pending, total, cfg.feedback, policy_dir)
        return sample_rows, comparisons, None

    def _previous_preferences(self, k: int) -> list[dict]:
        rows: list[dict] = []
        if self.cfg.preferences:
            from chatsmith.data.formats import load_examples

            if not Path(self.cfg.preferences).is_file():
                raise ChatsmithError(f"--preferences {self.cfg.preferences}: file not found")
            for ex in load_examples(self.cfg.preferences, kind="preference").examples:
                rows.append({"prompt": ex.prompt, "ranked": list(ex.responses)})
        for j in range(1, k):
            path = self.round_dir(j) / "new_preferences.jsonl"
            if path.is_file():
                rows.extend(read_jsonl(path))
        return rows

    def lora_settings(self) -> dict[str, Any]:
        """The --lora-* settings every round's reward model and PPO get (their YAML may override them)."""
        cfg = self.cfg
        return {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                "lora_targets": cfg.lora_targets}

    def train_reward_model(self, k: int, rdir: Path) -> dict[str, Any]:
        from chatsmith.train.reward import RewardConfig, train_reward_model

        cfg = self.cfg
        # The YAML may use transformers' names (learning_rate): the defaults below must see them as fields.
        overrides = canonical_settings(RewardConfig, self.rm_overrides, cfg.rm_config or "rlhf")
        settings = {**overrides, "model": cfg.policy, "data": str(rdir / "preferences.jsonl"),
                    "out": str(rdir / "rm"), "seed": cfg.seed + k, "device": cfg.device,
                    "resume": cfg.resume, "progress": cfg.progress}
        settings.update({k: v for k, v in self.lora_settings().items() if k not in overrides})
        settings.setdefault("max_steps", cfg.rm_steps)
        settings.setdefault("epochs", cfg.rm_epochs)
        settings.setdefault("lr", cfg.rm_lr)
        settings.setdefault("batch_size", cfg.rm_batch_size)
        settings.setdefault("dtype", cfg.dtype)
        rm_cfg = config_from_dict(RewardConfig, settings, source=cfg.rm_config or "rlhf")
        note(f"rlhf: round {k}: training the reward model on {rdir / 'preferences.jsonl'}")
        return train_reward_model(rm_cfg) or {}

    def run_ppo(self, k: int, policy_dir: str, rdir: Path):
        cfg = self.cfg
        overrides = canonical_settings(PPOConfig, self.ppo_overrides, cfg.ppo_config or "rlhf")
        settings = {**overrides, "policy": policy_dir, "reward_model": str(rdir / "rm"),
                    "reference": cfg.policy if cfg.kl_anchor == "sft" else policy_dir,
                    "prompts": cfg.prompts, "out": str(rdir / "ppo"), "seed": cfg.seed + k,
                    "device": cfg.device, "resume": cfg.resume, "progress": cfg.progress}
        settings.update({k: v for k, v in self.lora_settings().items() if k not in overrides})
        settings.setdefault("max_steps", cfg.ppo_steps)
        settings.setdefault("lr", cfg.ppo_lr)
        settings.setdefault("max_new_tokens", cfg.max_new_tokens)
        settings.setdefault("max_len", cfg.max_len)
        settings.setdefault("dtype", cfg.dtype)
        settings.setdefault("rollout_max_batch", cfg.rollout_max_batch)
        ppo_cfg = config_from_dict(PPOConfig, settings, source=cfg.ppo_config or "rlhf")
        note(f"rlhf: round {k}: PPO from {policy_dir} against {rdir / 'rm'}")
        return PPOTrainer(ppo_cfg).run()

    def _export_final(self, policy_dir: Path) -> None:
        """Copy the last policy's model files into OUT (a standard HF chat model directory)."""
        if is_main_process() and policy_dir.resolve() != self.out.resolve():
            for path in policy_dir.iterdir():
                # Model files only: not the PPO run's own files (its metrics, marker and lock).
                if (path.is_file() and not path.name.startswith(".")
                        and path.name not in ("metrics.jsonl", "samples.jsonl", "train_config.yaml")):
                    tmp = self.out / f".{path.name}.tmp"
                    shutil.copyfile(path, tmp)
                    tmp.replace(self.out / path.name)
        barrier()


def rlhf(cfg: RLHFConfig) -> list[RoundResult]:
    """`chatsmith rlhf`: see the module docstring."""
    validate_config(cfg)              # every setting, before any work (Python callers too)
    try:
        results = _RLHF(cfg).run()
    except LabelsPending as waiting:  # not a failure: the round goes on when the same command runs again
        print(str(waiting), flush=True)
        return []
    for r in results if is_main_process() else ():
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.metrics.items())
        print(f"rlhf round {r.round}: {shown}", file=sys.stderr)
    return results
