"""Continuous batching for serving: one scheduler thread per served model drives a
`chatsmith.generate.continuous.ContinuousBatch` (the decode loop the RL rollouts share).

    scheduler = Scheduler(model, tokenizer, max_batch=16, max_queue=64)
    scheduler.start()
    job = Job(prompt_ids, max_new=64, sampling=RowSampling(0.7, seed=1), stop_ids={eos}, emit=callback)
    scheduler.submit([job])            # raises QueueFull past max_queue waiting jobs
    ...                                # callback(Event) from the scheduler thread: text pieces, then "done"
    job.cancel()                       # e.g. the client went away: it leaves at the next step
    scheduler.stop()

Each loop iteration: (1) waiting jobs, up to the free batch slots, are prefilled (in groups of similar
prompt lengths, so little padding is computed), sample their first token and join the running rows; (2) one decode step feeds every running row its last token and
samples the next one with that row's own settings (both in `ContinuousBatch`); rows that hit a stop token, a stop string, their
token limit or were cancelled leave right away. So a new request joins at the next step and a short
reply never waits for the batch's longest one. `chatsmith.serve.worker` runs this scheduler in a model
process of its own (`after_iteration` sends each iteration's events to the server process at once).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from chatsmith.generate.batch import DecodeBatch
from chatsmith.generate.continuous import ContinuousBatch
from chatsmith.generate.row_sampling import RowSampling
from chatsmith.generate.text import RowText, byte_level_table

__all__ = ["Job", "Event", "Scheduler", "QueueFull", "length_groups"]


class QueueFull(Exception):
    """More jobs wait than the scheduler's ``max_queue`` allows."""


@dataclass
class Event:
    """What a job reports: ``kind`` is "text" (a printable piece), "done" or "error"."""

    kind: str
    text: str = ""
    finish_reason: str | None = None      # "stop" (stop token or string), "length", "cancelled"
    completion_tokens: int = 0


@dataclass
class Job:
    """One sequence to generate. ``emit`` is called from the scheduler thread."""

    prompt: list[int]
    max_new: int
    sampling: RowSampling
    emit: Callable[[Event], None]
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    tokens: list[int] = field(default_factory=list)
    text: RowText | None = None
    cancelled: bool = False
    on_cancel: Callable[["Job"], None] | None = field(default=None, repr=False)   # e.g. tell a model process

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel(self)


def length_groups(lengths: Sequence[int], waste: float = 0.2) -> list[list[int]]:
    """Indices of ``lengths`` split into groups, shortest first, whose left padding stays under ``waste``
    of the group's padded size (a prefill computes every padding position too)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    total = 0
    for i in order:
        group = groups[-1] if groups else None
        if group is not None:
            padded = (len(group) + 1) * lengths[i]
            if padded - (total + lengths[i]) <= waste * padded:
                group.append(i)
                total += lengths[i]
                continue
        groups.append([i])
        total = lengths[i]
    return groups


class Scheduler:
    """Runs the jobs of one model in a background thread (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 16, max_queue: int = 64,
                 metrics: Any = None, name: str = "model"):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max(1, max_batch), max(0, max_queue)
        self.name = name
        self.metrics = None            # ModelMetrics, see attach_metrics
        if metrics is not None:
            self.attach_metrics(metrics)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.core = ContinuousBatch(model, pad_id=pad)
        self.table = byte_level_table(tokenizer)
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        # called after each loop iteration and once at the end (a model process sends that iteration's
        # events to the server process in one message: `chatsmith.serve.worker`)
        self.after_iteration: Callable[[], None] | None = None

    # ------------------------------------------------------------------ control

    def attach_metrics(self, metrics: Any) -> None:
        """Report to ``metrics`` (a ServeMetrics) under this scheduler's model name."""
        self.metrics = metrics.for_model(self.name)

    def start(self) -> "Scheduler":
        self.thread = threading.Thread(target=self._loop, name=f"chatsmith-scheduler-{self.name}", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` together, or raise QueueFull if that would pass ``max_queue`` waiting jobs."""
        with self.cond:
            if len(self.waiting) + len(jobs) > self.max_queue + max(0, self.max_batch - len(self.running)):
                raise QueueFull(f"{len(self.waiting)} requests are waiting (limit {self.max_queue})")
            for job in jobs:
                job.text = RowText(self.tokenizer, self.table, job.stop_strings)
                self.waiting.append(job)
            self.cond.notify_all()
        self._gauges()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> list[Job]:
        """The jobs in the running batch."""
        return self.core.running

    @property
    def batch(self) -> DecodeBatch:
        return self.core.batch

    @property
    def steps(self) -> int:
        """Decode steps run (``rows_stepped / steps`` is the mean batch size)."""
        return self.core.steps

    @property
    def rows_stepped(self) -> int:
        return self.core.rows_stepped

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.stopping and not self.waiting and not self.running:
                        self.cond.wait()
                    if self.stopping:
                        break
                    admit = self._take_waiting()
                try:
                    if admit:
                        self._admit(admit)
                    self._drop(i for i, job in enumerate(self.running) if job.cancelled)
                    if self.running:
                        self._step()
                except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the server
                    self._fail(admit + self.running, f"generation failed: {type(exc).__name__}: {exc}")
                self._gauges()
                if self.after_iteration is not None:
                    self.after_iteration()
        self._fail(list(self.waiting) + self.running, "the server is shutting down")
        if self.after_iteration is not None:
            self.after_iteration()

    def _take_waiting(self) -> list[Job]:
        """Pop the waiting jobs that fit the free batch slots (cancelled ones are answered and skipped)."""
        if self.running and not self.batch.can_merge:
            return []
        taken: list[Job] = []
        while self.waiting and len(self.running) + len(taken) < self.max_batch:
            job = self.waiting.popleft()
            if job.cancelled:
                self._finish(job, "cancelled")
            else:
                taken.append(job)
        return taken

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` in groups of similar prompt lengths (little padding), then merge them in."""
        groups = length_groups([len(job.prompt) for job in jobs]) if self.batch.can_merge else [range(len(jobs))]
        for n, group in enumerate(groups):
            if not self.batch.can_merge and self.running:
                # the model's first prefill found a cache that cannot take rows while others run: the rest
                # go back to the front of the queue and start once the running rows are done
                rest = [jobs[i] for g in groups[n:] for i in g]
                with self.cond:
                    self.waiting.extendleft(reversed(rest))
                return
            self._admit_group([jobs[i] for i in group])

    def _admit_group(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` as one group, sample their first tokens, merge the unfinished ones in."""
        self.core.admit(jobs, self._push)

    def _step(self) -> None:
        rows = len(self.running)
        self.core.step(self._push)
        if self.metrics is not None:
            self.metrics.steps.inc()
            self.metrics.rows.inc(rows)

    def _push(self, job: Job, token: int) -> bool:
        """Take one sampled token of ``job`` (already in ``job.tokens``), send its new text; True when
        the job is finished."""
        if self.metrics is not None:
            self.metrics.tokens.inc()
        if len(job.tokens) == 1:
            job.first_token_at = time.monotonic()
            if self.metrics is not None:
                self.metrics.ttft.observe(job.first_token_at - job.submitted)
        hit_string = job.text.push(token)
        stopped = token in job.stop_ids or hit_string
        done = stopped or len(job.tokens) >= job.max_new or job.cancelled
        piece = job.text.new_printable(done=done, stop_token_hit=stopped and not hit_string)
        if piece:
            self._send(job, Event("text", piece))
        if done:
            self._finish(job, "stop" if stopped else "cancelled" if job.cancelled else "length")
        return done

    def _drop(self, rows: Iterable[int]) -> None:
        """Answer cancelled running rows and remove them from the batch."""
        gone = sorted(set(rows))
        for i in gone:
            self._finish(self.running[i], "cancelled")
        self.core.drop(gone)

    def _finish(self, job: Job, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.latency.observe(time.monotonic() - job.submitted)
        self._send(job, Event("done", finish_reason=reason, completion_tokens=len(job.tokens)))

    def _fail(self, jobs: list[Job], message: str) -> None:
        for job in {id(job): job for job in jobs}.values():
            self._send(job, Event("error", text=message))
        self.core.clear()
        if self.stopping:
            self.waiting.clear()

    def _send(self, job: Job, event: Event) -> None:
        try:
            job.emit(event)
        except Exception:  # noqa: BLE001 - a listener that went away must not stop the others
            job.cancelled = True

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.waiting))
            self.metrics.batch_size.set(len(self.running))
