"""One run loop for every training stage: the `Run` owns everything around the steps, a `Stage` supplies them.

    class MyStage(Stage):                       # what a stage supplies
        name = "my_stage"
        def train_step(self) -> dict: ...       # one optimizer step (or one rollout + its updates); step += 1
        def checkpoint_parts(self): return CheckpointParts(model, optimizer, scheduler, data_source)

    run = Run(cfg, "my_stage")                  # device, torchrun process group, checkpointer, metrics file
    result = run.train(MyStage(...))            # -> OUT/: the final model, metrics.jsonl, checkpoint/

What the Run does, the same for every stage:
- claims OUT before writing anything (`chatsmith.train.outdir`: not an input model, a run of this command
  or `--overwrite`, one run at a time through OUT/.lock, leftovers of a dead run removed);
- writes OUT/train_config.yaml; with `--resume` loads OUT/checkpoint (weights, optimizer, scheduler, RNG
  states, data position, the stage's extra state such as PPO's KL controller) and drops the rows of
  metrics.jsonl and samples.jsonl written after it; without, starts those files afresh;
- calls `stage.train_step()` until `--max-steps`, showing a progress bar (the stage's loss or score,
  tokens or episodes per second, ETA) and writing a metrics row every `--log-every` steps, also as
  TensorBoard scalars with `--report-to tensorboard`;
- evaluates every `--eval-every` steps and at the end (`stage.evaluate()`; with a `best_metric` the best
  weights go to OUT/checkpoint-best), writes sample tables every `stage.sample_every` steps
  (`stage.sample_rows`), checkpoints every `--save-every` steps and at the end;
- saves `stage.final_model()` as a standard HF directory in OUT (`checkpoint.save_final_model`), then
  `stage.save_extras(OUT)` (PPO's value model), and waits for every rank;
- on Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and raises
  `errors.Interrupted` saying where it is (a second signal stops at once, keeping the last checkpoint).

The supervised stages' step is `chatsmith.train.supervised.Trainer`; PPO's and GRPO's are `PPOTrainer` and
`GRPOTrainer` (a rollout, then minibatch epochs). Tests: `python -m pytest tests/test_train_loop.py -q`.
"""

from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from chatsmith.config import save_config
from chatsmith.errors import ChatsmithError, Interrupted
from chatsmith.train.checkpoint import Checkpointer, save_final_model
from chatsmith.train.config import TrainConfig, check_train_config
from chatsmith.train.devices import Precision, resolve_dtype
from chatsmith.train.outdir import claim_out_dir
from chatsmith.train.parallel import all_reduce_sum
from chatsmith.train.progress import (Progress, TensorBoardWriter, append_samples, format_samples_table,
                                      require_tensorboard, truncate_samples)
from chatsmith.utils import MetricsLogger, barrier, init_distributed, is_main_process, note, resolve_device

__all__ = ["Run", "Stage", "CheckpointParts", "TrainResult", "TrainingDiverged"]


class TrainingDiverged(ChatsmithError):
    """The loss or the gradient norm became NaN/inf."""


@dataclass
class CheckpointParts:
    """What a checkpoint of a stage holds (each object with ``state_dict`` / ``load_state_dict``)."""

    model: nn.Module                 # PPO: policy and value model in one ModuleDict
    optimizer: Any = None
    scheduler: Any = None
    data: Any = None                 # the resumable batch source
    tokenizer: Any = None            # saved beside the weights (pretraining's freshly trained tokenizer)


@dataclass
class TrainResult:
    out: Path
    step: int
    loss: float | None               # the last step's loss
    eval: dict[str, float]           # the last evaluation
    resumed_from: int | None
    metrics: dict[str, float] = field(default_factory=dict)   # the last step's metrics

    def done_line(self, stage: str) -> str:
        """What a supervised command prints at the end: step, last train loss, last evaluation, where OUT is."""
        ev = ", ".join(f"{k} {v:.3f}" for k, v in self.eval.items())
        loss = f"{self.loss:.3f}" if self.loss is not None else "n/a"
        return (f"{stage}: done at step {self.step}, train loss {loss}{', ' + ev if ev else ''}; "
                f"model saved to {self.out}")


class Stage:
    """A stage's side of a `Run`: its step and what its checkpoint holds. Every hook has a default."""

    name: str = "train"
    step: int = 0                        # steps done; the Run sets it on resume, train_step adds one
    tokenizer: Any = None                # saved with the final model
    progress_keys: tuple[str, ...] = ("loss", "lr")   # metrics shown on the progress bar
    throughput: str = "tokens"           # the metrics key the bar counts per second (tokens, episodes)
    sample_every: int = 0                # write sample_rows every N steps (0 = never)
    num_samples: int = 0
    save_final: bool = True              # save final_model() into OUT at the end
    extra_files: dict[str, str] | None = None   # written next to the final model

    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def checkpoint_parts(self) -> CheckpointParts:
        raise NotImplementedError

    def final_model(self) -> nn.Module:
        return self.checkpoint_parts().model

    def final_weights(self) -> dict | None:
        """The final model's weights gathered on every rank (FSDP), or None to save the model's own."""
        return None

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        return None

    def evaluate(self) -> dict[str, float]:
        return {}

    def sample_rows(self, n: int) -> list[dict[str, Any]]:
        return []

    def save_extras(self, out: Path) -> None:
        """Main process, after the final model: anything else the stage leaves in OUT."""
        return None


class Run:
    """Config, resume, RNG, distributed setup, progress, logging, evaluation, samples, checkpoints and the
    final save around a stage's steps; see the module docstring. Build it first: stages take ``device``,
    ``amp_dtype``, ``precision`` (autocast and fp16 loss scaling) and ``distributed`` from it."""

    def __init__(self, cfg: TrainConfig, stage: str, best_metric: str | None = None):
        check_train_config(cfg)
        if getattr(cfg, "dry_run", False):
            raise ChatsmithError("--dry-run: the `chatsmith` command prints the estimate and exits; from Python "
                                 "call chatsmith.train.memory.dry_run(command, cfg) instead of training")
        self.cfg, self.stage_name, self.best_metric = cfg, stage, best_metric
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.amp_dtype = resolve_dtype(cfg.dtype, self.device)   # refuses fp16 off CUDA before OUT is touched
        self.precision = Precision(self.amp_dtype, self.device)  # autocast, and loss scaling for fp16
        self.claim = claim_out_dir(cfg, stage)             # before any write into OUT
        self.distributed = init_distributed(self.device)   # under torchrun: join before any wrapping
        if cfg.report_to == "tensorboard":
            require_tensorboard()          # fail before training, not at the first metrics row
        self.checkpointer = Checkpointer(self.out)
        self.logger = MetricsLogger(self.out, stage=stage)
        self.board: TensorBoardWriter | None = None
        self.best_value: float | None = None
        self.saved_step: int | None = None     # the step of this run's latest checkpoint (resumed or written)
        self.last: dict[str, float] = {}       # the last step's metrics
        self.last_eval: dict[str, float] = {}

    # -- the loop ----------------------------------------------------------------------------------
    def train(self, stage: Stage) -> TrainResult:
        try:
            return self.run_stage(stage)
        finally:
            self.claim.release()        # OUT is free for the next run (in this process or another)

    def run_stage(self, stage: Stage) -> TrainResult:
        """Resume or start afresh, the loop, the final save; see the module docstring."""
        cfg = self.cfg
        resumed_from = self.start(stage)
        if is_main_process():
            save_config(cfg, self.out / "train_config.yaml")
        if cfg.report_to == "tensorboard":
            self.board = TensorBoardWriter(self.out / "tensorboard",
                                           purge_step=None if resumed_from is None else resumed_from + 1)
        unit = "tok" if stage.throughput == "tokens" else stage.throughput
        progress = Progress(cfg.max_steps, initial=stage.step, desc=self.stage_name,
                            enabled=cfg.progress and sys.stderr.isatty(), unit=unit)
        try:
            with StopSignals() as signals:
                self.loop(stage, progress, resumed_from, signals)
        except KeyboardInterrupt as exc:
            raise self.interrupted(exc, stage) from None
        finally:
            progress.close()
            if self.board is not None:
                self.board.close()
        return TrainResult(self.out, stage.step, self.last.get("loss"), self.last_eval, resumed_from, self.last)

    def loop(self, stage: Stage, progress: Progress, resumed_from: int | None, signals: StopSignals) -> None:
        """The steps, then the final evaluation, checkpoint and save; stops early (raising `Interrupted`
        after a checkpoint) when a signal asked it to."""
        cfg = self.cfg
        unit = "tok" if stage.throughput == "tokens" else stage.throughput
        self.last, self.last_eval = {}, {}
        last: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        window_start, window_tokens = time.perf_counter(), 0
        while stage.step < cfg.max_steps:
            last = stage.train_step()
            step, count = stage.step, int(last.get(stage.throughput, 0))
            window_tokens += count
            rate = progress.update(1, count, **{k: last[k] for k in stage.progress_keys if k in last})
            if step % max(1, cfg.log_every) == 0 or step == cfg.max_steps:
                row = dict(last)
                if "tokens" in last:
                    row["tokens_per_s"] = window_tokens / max(1e-9, time.perf_counter() - window_start)
                window_start, window_tokens = time.perf_counter(), 0
                self.log(step, row)
                if progress.bar is None and is_main_process() and cfg.progress:
                    shown = " ".join(f"{k} {last[k]:.4g}" for k in stage.progress_keys if k in last)
                    note(f"{self.stage_name} step {step}/{cfg.max_steps} {shown} {rate:,.0f} {unit}/s")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                last_eval = self.evaluate(stage)
                if last_eval:
                    progress.write(f"{self.stage_name} step {step}: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in last_eval.items()))
            if stage.sample_every and (step % stage.sample_every == 0 or step == cfg.max_steps):
                self.write_samples(stage.sample_rows(stage.num_samples), progress)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                self.save_checkpoint(stage, last)
            self.last, self.last_eval = last, last_eval
            if self.stop_requested(signals) and stage.step < cfg.max_steps:
                self.stop(stage, last, signals.signum or signal.SIGINT)
        progress.close()
        trained = resumed_from is None or stage.step > resumed_from
        # A finished run resumed again trains nothing: its final evaluation is already in metrics.jsonl.
        last_eval = self.evaluate(stage, log=trained) or last_eval
        self.last, self.last_eval = last, last_eval
        if trained:
            self.save_checkpoint(stage, last)
        self.save_final(stage)

    # -- pieces --------------------------------------------------------------------------------------
    def start(self, stage: Stage) -> int | None:
        """Resume if asked and possible (returns the step resumed from), else start the run's files afresh."""
        cfg, ckpt = self.cfg, self.checkpointer
        if cfg.resume and ckpt.path.is_dir() and not ckpt.exists():
            raise ChatsmithError(f"--resume: {ckpt.path} is incomplete (model.safetensors and state.pt expected); "
                                 f"run the same command with --overwrite instead of --resume to start over")
        if cfg.resume and ckpt.exists():
            parts = stage.checkpoint_parts()
            state = ckpt.load(parts.model, parts.optimizer, parts.scheduler, parts.data)
            stage.step = self.saved_step = int(state["step"])
            extra = state.get("extra") or {}
            self.best_value = extra.get("best_value")
            stage.load_extra_state(extra)
            self.precision.load_state_dict(extra.get("grad_scaler") or {})
            self.logger.truncate_after(stage.step)
            truncate_samples(self.out / "samples.jsonl", stage.step)
            if stage.step >= cfg.max_steps:
                note(f"{ckpt.path} is already at step {stage.step} >= --max-steps {cfg.max_steps}")
            else:
                note(f"resuming {self.stage_name} from {ckpt.path} at step {stage.step}")
            return stage.step
        if cfg.resume:
            note(f"--resume: no checkpoint in {ckpt.path}, starting from step 0")
        elif ckpt.exists():
            note(f"{ckpt.path} exists (step {ckpt.step()}); starting over (pass --resume to continue it)")
        if is_main_process():
            for name in ("metrics.jsonl", "samples.jsonl"):
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
        return None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One row of metrics.jsonl (and of TensorBoard scalars when asked)."""
        row = self.logger.log(step, **metrics)
        if self.board is not None:
            self.board.log(step, row)

    def evaluate(self, stage: Stage, log: bool = True) -> dict[str, float]:
        """Run the stage's evaluation; when `log`, log it with ``eval_`` names and keep the best weights if
        asked."""
        result = {(k if k.startswith("eval") else f"eval_{k}"): float(v) for k, v in stage.evaluate().items()}
        if not log:
            return result
        if result:
            self.log(stage.step, result)
        if self.best_metric and self.best_metric in result:
            value = result[self.best_metric]
            if self.best_value is None or value < self.best_value:
                self.best_value = value
                self.checkpointer.save_best(stage.checkpoint_parts().model, stage.step, self.best_metric, value)
        return result

    def write_samples(self, rows: list[dict[str, Any]], progress: Progress) -> None:
        if rows and is_main_process():
            append_samples(self.out / "samples.jsonl", rows)
            progress.write(format_samples_table(rows))

    def save_checkpoint(self, stage: Stage, last: dict[str, float]) -> None:
        """Every rank calls it (FSDP gathers the shards); rank 0 writes."""
        parts = stage.checkpoint_parts()
        self.checkpointer.save(stage.step, parts.model, parts.optimizer, parts.scheduler,
                               parts.data.state_dict() if parts.data is not None else None,
                               tokenizer=parts.tokenizer, extra={**stage.extra_state(), "best_value": self.best_value,
                                                      "grad_scaler": self.precision.state_dict()},
                               info={"stage": self.stage_name, "loss": last.get("loss"),
                                     "max_steps": self.cfg.max_steps})
        self.saved_step = stage.step

    def save_final(self, stage: Stage) -> None:
        if stage.save_final:
            weights = stage.final_weights()          # a collective under FSDP: every rank
            if is_main_process():
                save_final_model(stage.final_model(), stage.tokenizer, self.out, stage.extra_files,
                                 state_dict=weights)
                stage.save_extras(self.out)
        barrier()   # the other ranks wait while rank 0 writes

    # -- stopping on a signal ------------------------------------------------------------------------
    def stop_requested(self, signals: StopSignals) -> bool:
        """Did any rank receive SIGINT/SIGTERM? (Every rank must stop after the same step to checkpoint.)"""
        flag = 1.0 if signals.signum is not None else 0.0
        return (all_reduce_sum([flag], self.device)[0] if self.distributed else flag) > 0

    def stop(self, stage: Stage, last: dict[str, float], signum: int) -> None:
        """After a step: write a checkpoint (unless this step's is already written) and raise `Interrupted`."""
        if self.saved_step != stage.step:
            self.save_checkpoint(stage, last)
        name = signal.Signals(signum).name
        raise Interrupted(signum, f"{name}: stopped after step {stage.step} of {self.cfg.max_steps} and saved "
                                  f"{self.checkpointer.path} (step {stage.step}); run the same command with "
                                  f"--resume to continue")

    def interrupted(self, exc: KeyboardInterrupt, stage: Stage) -> Interrupted:
        """The exception to raise for an interruption inside the loop, with a message that says truly what
        is kept."""
        if isinstance(exc, Interrupted) and exc.message:
            return exc
        signum = exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)
        where = f"interrupted after {stage.step} completed steps"
        if self.saved_step is not None:
            kept = (f"the checkpoint of step {self.saved_step} in {self.checkpointer.path} is intact; run the "
                    f"same command with --resume to continue from it")
        elif self.checkpointer.exists():
            kept = (f"this run wrote no checkpoint yet ({self.checkpointer.path} still holds an earlier run's step "
                    f"{self.checkpointer.step()}); run the command again to start over")
        else:
            kept = "no checkpoint was written yet; run the command again to start over"
        return Interrupted(signum, f"{where}; {kept}")


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM (schedulers, `docker stop`) only ask the loop to stop after
    the current step, so it can write a checkpoint; a second signal stops at once (`Interrupted`)."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():   # handlers only work there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        note(f"\n{signal.Signals(signum).name}: finishing the current step, then writing a checkpoint "
             f"(send it again to stop at once)")
