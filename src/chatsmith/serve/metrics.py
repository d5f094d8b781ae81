"""Prometheus metrics of `chatsmith serve`, exposed at `GET /metrics` (text format).

    chatsmith_requests_total{route, status}              HTTP requests answered, by route and status code
    chatsmith_queue_depth{model}                          requests waiting for a batch slot
    chatsmith_running_batch_size{model}                   sequences in the running batch
    chatsmith_time_to_first_token_seconds{model}          histogram: submit -> first token sampled
    chatsmith_request_latency_seconds{model}              histogram: submit -> last token (per sequence)
    chatsmith_generated_tokens_total{model}               tokens sampled
    chatsmith_decode_steps_total{model}                   decode steps; rows_total / steps_total = mean batch
    chatsmith_decode_rows_total{model}
    chatsmith_guard_replies_total{model, outcome}         with --guard: chat replies judged, passed or refused

Each app has its own registry, so several servers in one process (tests) do not share counts.

Tests: `python -m pytest tests/test_serve.py -q`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServeMetrics", "ModelMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ModelMetrics(NamedTuple):
    """One model's labelled metrics, looked up once (a label lookup per token costs a lock and a dict)."""

    queue_depth: Any
    batch_size: Any
    ttft: Any
    latency: Any
    tokens: Any
    steps: Any
    rows: Any


class ServeMetrics:
    """The metric objects the app and the schedulers update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("chatsmith_requests", "HTTP requests answered, by route and status code.",
                                ["route", "status"], registry=r)
        self.queue_depth = Gauge("chatsmith_queue_depth", "Requests waiting for a batch slot.", ["model"],
                                 registry=r)
        self.batch_size = Gauge("chatsmith_running_batch_size", "Sequences in the running batch.", ["model"],
                                registry=r)
        self.ttft = Histogram("chatsmith_time_to_first_token_seconds", "Submit to first sampled token.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("chatsmith_request_latency_seconds", "Submit to last token, per sequence.",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("chatsmith_generated_tokens", "Tokens sampled.", ["model"], registry=r)
        self.steps = Counter("chatsmith_decode_steps", "Decode steps run.", ["model"], registry=r)
        self.rows = Counter("chatsmith_decode_rows", "Rows fed over all decode steps.", ["model"], registry=r)
        self.guard = Counter("chatsmith_guard_replies", "Chat replies the guard judged, by outcome (passed, refused).",
                             ["model", "outcome"], registry=r)

    def for_model(self, name: str) -> ModelMetrics:
        return ModelMetrics(*(metric.labels(name) for metric in (
            self.queue_depth, self.batch_size, self.ttft, self.latency, self.tokens, self.steps, self.rows)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
