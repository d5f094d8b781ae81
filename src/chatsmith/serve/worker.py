"""A model's decode loop in its own process: `ProcessScheduler` stands in for `serve.scheduler.Scheduler`
in the server process, the real scheduler runs in a forked child.

    scheduler = ProcessScheduler(model, tokenizer, max_batch=16, max_queue=64, name="runs/sft")
    scheduler.start()                  # forks: the child shares the loaded weights (copy-on-write)
    scheduler.submit([job])            # the same Job objects; job.emit is called in this process
    job.cancel()                       # reaches the child at its next loop iteration
    scheduler.stop()

Why: in one process the event loop (HTTP, one server-sent event per token and request) and the decode
loop share one GIL, so the decode step waits while the event loop writes and the server uses about one
core. With the decode loop in a child the two run on two cores.

The pipes: the server sends ("submit", [job specs]), ("cancel", id) and ("stop",); the child sends, after
each iteration of its loop, one ("events", [(id, kind, text, finish_reason, completion_tokens)], metrics)
message with that iteration's events of every job (a decode step of 32 rows: one message, not 32) and
the metric updates its scheduler recorded (`MetricsRecorder`), which a reader thread here replays onto
`/metrics` and the jobs' ``emit``. The child exits on "stop" or when the server process goes away (end of
its pipe); if the child dies, every open job gets an "error" event.

The child is forked (not spawned: it needs no second load of the model and starts in milliseconds), so
this is for CPU models only; `serve --scheduler auto` uses it on the CPU under Linux and the in-process
thread elsewhere (a CUDA context does not survive a fork, nor do some macOS libraries). A forked child cannot use its parent's OpenMP thread pool
(its first multi-threaded op hangs), so the child runs ``threads`` torch threads (default 1) only as
`chatsmith serve` arranges it: the server process itself then runs one thread and never starts a pool.

Tests: `python -m pytest tests/test_serve_worker.py -q`.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import signal
import threading
from typing import Any, Sequence

from chatsmith.generate.row_sampling import RowSampling
from chatsmith.serve.scheduler import Event, Job, QueueFull, Scheduler

__all__ = ["ProcessScheduler", "MetricsRecorder"]


class _Count:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Observations:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)


class _Level:
    def __init__(self) -> None:
        self.value: float | None = None

    def set(self, value: float) -> None:
        self.value = value


class MetricsRecorder:
    """What a `Scheduler` reports to its `ModelMetrics` (same attribute names), kept until `take()`."""

    def __init__(self) -> None:
        self.queue_depth, self.batch_size = _Level(), _Level()
        self.ttft, self.latency = _Observations(), _Observations()
        self.tokens, self.steps, self.rows = _Count(), _Count(), _Count()

    def take(self) -> tuple | None:
        """The updates since the last call as a plain tuple (None if there were none), and reset."""
        update = (self.tokens.value, self.steps.value, self.rows.value, self.ttft.values, self.latency.values,
                  self.queue_depth.value, self.batch_size.value)
        if not any(update[:5]) and update[5] is None and update[6] is None:
            return None
        self.__init__()
        return update

    @staticmethod
    def replay(update: tuple, metrics: Any) -> None:
        """Apply an update from `take()` to a `ModelMetrics`."""
        tokens, steps, rows, ttft, latency, depth, batch = update
        if tokens:
            metrics.tokens.inc(tokens)
        if steps:
            metrics.steps.inc(steps)
        if rows:
            metrics.rows.inc(rows)
        for value in ttft:
            metrics.ttft.observe(value)
        for value in latency:
            metrics.latency.observe(value)
        if depth is not None:
            metrics.queue_depth.set(depth)
        if batch is not None:
            metrics.batch_size.set(batch)


def _spec(job_id: int, job: Job) -> tuple:
    """What the child needs of a job (picklable; the sampling stream starts fresh in the child)."""
    s = job.sampling
    return (job_id, job.prompt, job.max_new, (s.temperature, s.top_p, s.top_k, s.seed), job.stop_ids,
            job.stop_strings, job.submitted)


class ProcessScheduler:
    """The server side of a model process (see the module docstring); the interface `serve.app` uses."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 16, max_queue: int = 64,
                 metrics: Any = None, name: str = "model", threads: int = 1):
        self.model, self.tokenizer = model, tokenizer
        self.threads = max(1, threads)
        self.max_batch, self.max_queue = max(1, max_batch), max(0, max_queue)
        self.name = name
        self.metrics = None
        if metrics is not None:
            self.attach_metrics(metrics)
        self.jobs: dict[int, Job] = {}              # submitted, not yet done
        self.ids = itertools.count()
        self.lock = threading.Lock()                # the job table and the command pipe
        self.thread: threading.Thread | None = None  # reads the child's events
        self.process: Any = None
        self.commands = self.events = None
        self.queue_depth = 0                        # the child's last report
        self.batch_size = 0

    def attach_metrics(self, metrics: Any) -> None:
        self.metrics = metrics.for_model(self.name)

    # ------------------------------------------------------------------ control

    def start(self) -> "ProcessScheduler":
        ctx = multiprocessing.get_context("fork")
        command_read, command_write = ctx.Pipe(duplex=False)
        event_read, event_write = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_child_main, name=f"chatsmith-model-{self.name}", daemon=True,
                                   args=(self.model, self.tokenizer, self.max_batch, self.threads,
                                         command_read, event_write, (command_write, event_read)))
        self.process.start()
        command_read.close()
        event_write.close()
        self.commands, self.events = command_write, event_read
        try:                          # wait until it is set up (the inherited sockets closed)
            ready = event_read.poll(60) and event_read.recv() == ("ready",)
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.process.kill()
            raise RuntimeError(f"the model process of {self.name} did not start")
        self.thread = threading.Thread(target=self._read, name=f"chatsmith-events-{self.name}", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        self._send(("stop",))
        if self.thread is not None:
            self.thread.join(timeout)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.commands.close()
        self.events.close()

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` together, or raise QueueFull if that would pass ``max_queue`` waiting jobs (the
        jobs not done, less the batch slots, as `Scheduler.submit` counts them)."""
        with self.lock:
            waiting = max(0, len(self.jobs) - self.max_batch)
            if len(self.jobs) + len(jobs) > self.max_queue + self.max_batch:
                raise QueueFull(f"{waiting} requests are waiting (limit {self.max_queue})")
            specs = []
            for job in jobs:
                job_id = next(self.ids)
                self.jobs[job_id] = job
                job.on_cancel = lambda _job, job_id=job_id: self._send(("cancel", job_id))
                specs.append(_spec(job_id, job))
            self._send_locked(("submit", specs))      # under the lock: no cancel of these jobs can go first

    @property
    def running(self) -> int:
        """How many rows the child's batch had at its last report."""
        return self.batch_size

    # ------------------------------------------------------------------ pipes

    def _send(self, message: tuple) -> None:
        with self.lock:
            self._send_locked(message)

    def _send_locked(self, message: tuple) -> None:
        if self.commands is None:
            raise RuntimeError(f"the model process of {self.name} is not started (ProcessScheduler.start)")
        try:
            self.commands.send(message)
        except (OSError, ValueError):           # the child is gone: _read answers the open jobs
            pass

    def _read(self) -> None:
        """Hand the child's events to the jobs and its metric updates to /metrics, until it ends."""
        while True:
            try:
                _kind, events, update = self.events.recv()
            except (EOFError, OSError):
                break
            if update is not None:
                if update[5] is not None:
                    self.queue_depth = int(update[5])
                if update[6] is not None:
                    self.batch_size = int(update[6])
                if self.metrics is not None:
                    MetricsRecorder.replay(update, self.metrics)
            for job_id, kind, text, reason, tokens in events:
                job = self.jobs.get(job_id)
                if job is None:
                    continue
                if kind != "text":
                    with self.lock:
                        self.jobs.pop(job_id, None)
                _emit(job, Event(kind, text, reason, tokens))
        with self.lock:
            left, self.jobs = list(self.jobs.values()), {}
        for job in left:
            _emit(job, Event("error", text="the model process exited"))
        self.batch_size = self.queue_depth = 0


def _emit(job: Job, event: Event) -> None:
    try:
        job.emit(event)
    except Exception:  # noqa: BLE001 - a listener that went away must not stop the others
        job.cancelled = True


# ----------------------------------------------------------------------------- the child

def _child_main(model: Any, tokenizer: Any, max_batch: int, threads: int, commands: Any, events: Any,
                parent_ends: tuple) -> None:
    """The model process: a `Scheduler` whose jobs report into an outbox sent once per loop iteration."""
    import torch

    for end in parent_ends:           # else the pipes never reach end-of-file when the server goes away
        end.close()
    if threading.current_thread() is threading.main_thread():
        signal.set_wakeup_fd(-1)      # the server's event loop's wake-up socket, closed next
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C stops the server, which stops this process
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _close_inherited_sockets()
    torch.set_num_threads(threads)
    gc.freeze()                       # the inherited objects: no collector passes over them (nor copies of their pages)
    scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=1 << 30)
    recorder = MetricsRecorder()
    scheduler.metrics = recorder
    outbox: list[tuple] = []
    jobs: dict[int, Job] = {}
    send_lock = threading.Lock()

    def flush() -> None:
        with send_lock:
            update = recorder.take()
            if not outbox and update is None:
                return
            batch, outbox[:] = list(outbox), []
            try:
                events.send(("events", batch, update))
            except (OSError, ValueError):
                pass

    def emitter(job_id: int):
        def emit(event: Event) -> None:
            outbox.append((job_id, event.kind, event.text, event.finish_reason, event.completion_tokens))
            if event.kind != "text":
                jobs.pop(job_id, None)
        return emit

    scheduler.after_iteration = flush
    scheduler.start()
    events.send(("ready",))
    try:
        while True:
            try:
                message = commands.recv()
            except (EOFError, OSError):
                break
            if message[0] == "submit":
                batch = []
                for job_id, prompt, max_new, sampling, stop_ids, stop_strings, submitted in message[1]:
                    job = Job(prompt, max_new, RowSampling(*sampling), emitter(job_id), stop_ids, stop_strings,
                              submitted=submitted)
                    jobs[job_id] = job
                    batch.append(job)
                scheduler.submit(batch)
            elif message[0] == "cancel":
                job = jobs.get(message[1])
                if job is not None:
                    job.cancel()
                    with scheduler.cond:
                        scheduler.cond.notify_all()
            else:
                break
    finally:
        scheduler.stop()
        flush()
        events.close()


def _close_inherited_sockets() -> None:
    """Close the sockets the fork copied (the server's listening socket, open connections): a copy held
    here would keep a port bound, or a connection open, after the server closed its own."""
    import stat

    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:                   # no /proc (macOS): leave them
        return
    for fd in fds:
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            pass
