"""Tests for the model process of `chatsmith serve` (chatsmith.serve.worker) and the coalesced SSE writes:
jobs decoded in a forked process give the tokens the engine gives, the queue bound, a dying or stopped
process answers every open job, the process holds none of the server's sockets; queued text pieces of a
choice go out as one chunk. (tests/test_serve.py runs every HTTP test on a model process too.)

    python -m pytest tests/test_serve_worker.py -q
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading

import pytest
import torch

from chatsmith.generate import SamplingConfig, generate
from chatsmith.generate.row_sampling import RowSampling
from chatsmith.serve.app import chunk_event, stream_events
from chatsmith.serve.protocol import SamplingParams
from chatsmith.serve.scheduler import Event, Job, QueueFull
from chatsmith.serve.worker import MetricsRecorder, ProcessScheduler
from conftest import SAMPLE_TEXTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Collector:
    """Jobs whose events are kept; ``wait()`` until every job has its "done" or "error"."""

    def __init__(self) -> None:
        self.events: dict[int, list[Event]] = {}
        self.finished = threading.Semaphore(0)

    def job(self, index: int, prompt: list[int], max_new: int, **kw) -> Job:
        self.events[index] = []

        def emit(event: Event) -> None:
            self.events[index].append(event)
            if event.kind != "text":
                self.finished.release()
        return Job(prompt, max_new, kw.pop("sampling", RowSampling(0.0)), emit, **kw)

    def wait(self, count: int) -> None:
        for _ in range(count):
            assert self.finished.acquire(timeout=60), "a job got no final event"

    def text(self, index: int) -> str:
        return "".join(e.text for e in self.events[index] if e.kind == "text")


def test_model_process_decodes_what_the_engine_does(chatml_tok, induction_llama):
    prompts = [chatml_tok.encode(t) for t in SAMPLE_TEXTS[:6]]
    ref = generate(induction_llama, chatml_tok, prompts,
                   SamplingConfig(max_new_tokens=12, temperature=0, logprobs=False))
    got = Collector()
    scheduler = ProcessScheduler(induction_llama, chatml_tok, max_batch=4, max_queue=8).start()
    try:
        scheduler.submit([got.job(i, p, 12) for i, p in enumerate(prompts)])
        got.wait(len(prompts))
    finally:
        scheduler.stop()
    assert [got.text(i) for i in range(len(prompts))] == ref.texts
    assert all(got.events[i][-1].completion_tokens == len(ref.sequences[i]) for i in range(len(prompts)))
    assert not scheduler.process.is_alive() and not scheduler.jobs


def test_queue_bound_cancel_and_a_dead_process(chatml_tok, induction_llama):
    got = Collector()
    scheduler = ProcessScheduler(induction_llama, chatml_tok, max_batch=1, max_queue=1).start()
    try:
        running = got.job(0, [5, 6, 7], 250)
        scheduler.submit([running])
        while not got.events[0]:                               # it runs: its first piece arrived
            threading.Event().wait(0.005)
        running.cancel()
        got.wait(1)
        assert got.events[0][-1].finish_reason == "cancelled" and got.events[0][-1].completion_tokens < 250
        scheduler.submit([got.job(1, [5, 6, 7], 250), got.job(2, [8, 9], 250)])   # one batch slot, one waiting
        with pytest.raises(QueueFull):
            scheduler.submit([got.job(3, [1, 2], 3)])
        scheduler.process.kill()                               # the model process dies mid-answer
        got.wait(2)
        for i in (1, 2):
            assert got.events[i][-1].kind == "error" and "model process exited" in got.events[i][-1].text
    finally:
        scheduler.stop()
    assert not scheduler.jobs


def test_stop_answers_open_jobs_and_the_process_holds_no_server_socket(chatml_tok, induction_llama):
    listener = socket.create_server(("127.0.0.1", 0))          # a server's listening socket, inherited by the fork
    got = Collector()
    scheduler = ProcessScheduler(induction_llama, chatml_tok, max_batch=1, max_queue=4).start()
    try:
        if os.path.isdir(f"/proc/{scheduler.process.pid}/fd"):
            fds = os.listdir(f"/proc/{scheduler.process.pid}/fd")
            links = []
            for fd in fds:
                try:
                    links.append(os.readlink(f"/proc/{scheduler.process.pid}/fd/{fd}"))
                except OSError:
                    pass
            assert links and not [link for link in links if link.startswith("socket:")]
        scheduler.submit([got.job(i, [5, 6, 7, i + 8], 200) for i in range(3)])
    finally:
        scheduler.stop()
        listener.close()
    got.wait(3)
    assert [got.events[i][-1].kind for i in range(3)] == ["error"] * 3
    assert all("shutting down" in got.events[i][-1].text for i in range(3))
    assert not scheduler.process.is_alive()


def test_metrics_recorder_round_trip():
    recorder = MetricsRecorder()
    assert recorder.take() is None
    recorder.tokens.inc()
    recorder.tokens.inc()
    recorder.ttft.observe(0.5)
    recorder.batch_size.set(3)
    update = recorder.take()
    assert update == (2.0, 0.0, 0.0, [0.5], [], None, 3) and recorder.take() is None


class _FakeRun:
    """What `stream_events` reads of a `Run`: two choices whose events arrive in prepared batches."""

    def __init__(self, batches):
        from chatsmith.chat.reasoning import ReasoningSplitter
        from chatsmith.serve.app import chunk_head

        self.id, self.created, self.chat, self.prompt_tokens = "chatcmpl-x", 1700000000, True, 5
        self.served = type("Served", (), {"id": "tiny"})()
        self.chunk_head = chunk_head(self.id, True, self.created, "tiny")
        self.jobs = [None, None]
        self.splitters = [ReasoningSplitter(), ReasoningSplitter()]   # chat replies: thinking apart (none here)
        self.batches = batches

    async def events(self):
        for batch in self.batches:
            yield batch


def test_queued_pieces_of_a_choice_go_out_as_one_chunk():
    run = _FakeRun([
        [(0, Event("text", "He"))],                                                     # the writer keeps up
        [(0, Event("text", "llo")), (1, Event("text", "a")), (0, Event("text", " wo")),   # it fell behind
         (1, Event("text", "b")), (0, Event("text", "rld")), (0, Event("done", finish_reason="stop",
                                                                        completion_tokens=4)),
         (1, Event("text", "c"))],
        [(1, Event("done", finish_reason="length", completion_tokens=3))],
    ])
    params = SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, top_k=0, n=1, seed=None, stop=(),
                            stream=True, include_usage=True)

    async def collect():
        return [part async for part in stream_events(run, params, True)]

    writes = asyncio.run(collect())
    events = [json.loads(line[6:]) for w in writes for line in w.split("\n\n") if line.startswith("data: {")]
    texts = [(e["choices"][0]["index"], e["choices"][0]["delta"].get("content"), e["choices"][0]["finish_reason"])
             for e in events if e["choices"]]
    assert texts == [(0, "", None), (1, "", None), (0, "He", None),
                     (0, "llo world", None), (0, None, "stop"), (1, "abc", None), (1, None, "length")]
    assert writes[3] == (chunk_event(run, True, 0, "llo world", None) + chunk_event(run, True, 0, None, "stop")
                         + chunk_event(run, True, 1, "abc", None))
    assert events[-1]["usage"]["completion_tokens"] == 7 and writes[-1] == "data: [DONE]\n\n"
