"""`chatsmith serve MODEL_DIR [MODEL_DIR ...]`: an OpenAI-compatible HTTP server with continuous batching.

    chatsmith serve runs/demo/ppo                          # http://127.0.0.1:8000 (web chat at /)
    chatsmith serve runs/sft runs/demo/ppo --port 9000 --max-batch 32 --api-key secret
    chatsmith serve runs/demo/ppo --feedback runs/feedback.db --guard runs/demo/rm --guard-threshold -1

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="runs/sft", messages=[{"role": "user", "content": "Hi"}])

Each model directory is served under its path as given (the `model` field of a request). Routes:
`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`, `/metrics` (Prometheus), `/`, and
with `--feedback DB` `POST /v1/feedback` (a judgment of two responses, stored in SQLite; see
`chatsmith.serve.feedback`, exported as preferences by `chatsmith feedback export`) and
`GET /v1/feedback/pairs` (pairs `chatsmith rlhf --labeler human` queued for people to judge).
`--guard RM_DIR --guard-threshold T`: chat replies a reward model scores below T become a refusal
(`chatsmith.serve.guard`; guarded streams are sent once the reply is complete). On the CPU each model
decodes in a process of its own (`--scheduler auto`, `chatsmith.serve.worker`) with `--threads` torch
threads, and this process, which serves HTTP, runs one.

Tests: `python -m pytest tests/test_serve.py tests/test_serve_worker.py -q`.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

from chatsmith.config import arg
from chatsmith.errors import ChatsmithError

__all__ = ["ServeConfig", "serve", "build_app"]

API_KEY_ENV = "CHATSMITH_API_KEY"


@dataclass
class ServeConfig:
    models: list[str] = arg([], "Model directories to serve; each is a model id (its path as given).")
    host: str = arg("127.0.0.1", "Address to bind (0.0.0.0 exposes the server to the network).")
    port: int = arg(8000, "TCP port.")
    max_batch: int = arg(16, "Most sequences decoded together per model (continuous batching).")
    max_queue: int = arg(64, "Most requests waiting for a batch slot; past it requests get 503 + Retry-After.")
    max_new_tokens: int = arg(512, "Cap on a request's max_tokens (also its default).")
    api_key: str | None = arg(None, f"Require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}).")
    template: str | None = arg(None, "Chat format for every model: chatml, llama2, alpaca or FILE.jinja "
                                     "(default: each model's own).")
    max_body_bytes: int = arg(1_000_000, "Largest request body accepted (413 above).")
    device: str = arg("auto", "cpu, cuda, mps or auto.")
    threads: int = arg(0, "Torch CPU threads for generation, per model (0 = all cores but one, which is left to "
                          "the HTTP event loop: OpenMP threads spinning on every core starve it and slow streaming).")
    scheduler: str = arg("auto", "Where each model decodes: 'process' (a process of its own, so the HTTP event "
                                 "loop does not share its GIL; CPU only), 'thread' (a thread of the server "
                                 "process), 'auto' (process on the CPU under Linux, else thread).",
                         choices=["auto", "process", "thread"])
    feedback: str | None = arg(None, "SQLite file for human judgments posted to /v1/feedback "
                                      "(created if missing; default: feedback off).")
    guard: str | None = arg(None, "Reward-model directory: a chat reply it scores below --guard-threshold is "
                                  "replaced by a refusal (guarded streams are sent once the reply is complete).")
    guard_threshold: float = arg(0.0, "With --guard: the lowest normalised reward-model score a reply may have "
                                      "(in standard deviations of the RM's scores of SFT samples).")
    guard_refusal: str = arg("I'm sorry, but I can't help with that.", "With --guard: the reply a refused one "
                                                                        "is replaced by.")
    log_level: str = arg("info", "uvicorn's log level.", choices=["critical", "error", "warning", "info", "debug"])


def build_app(cfg: ServeConfig, model_threads: int = 1):
    """Load every model of ``cfg`` and return the ASGI app (schedulers start when the app starts).

    ``model_threads``: torch threads of each model process (`--scheduler process`). More than one only
    where this process has run no multi-threaded torch op yet (as `serve` ensures): a forked child cannot
    use the OpenMP thread pool of its parent, and hangs in its first parallel op."""
    from chatsmith.serve.app import ServedModel, create_app
    from chatsmith.serve.metrics import ServeMetrics

    if not cfg.models:
        raise ChatsmithError("serve: give at least one model directory (chatsmith serve MODEL_DIR)")
    for name, value in (("--max-batch", cfg.max_batch), ("--max-new-tokens", cfg.max_new_tokens),
                        ("--max-body-bytes", cfg.max_body_bytes)):
        if value < 1:
            raise ChatsmithError(f"{name}: expected at least 1, got {value}")
    if cfg.max_queue < 0:
        raise ChatsmithError(f"--max-queue: expected >= 0, got {cfg.max_queue}")
    ids = [str(m).rstrip("/") for m in cfg.models]
    if len(set(ids)) != len(ids):
        raise ChatsmithError("serve: the same model directory is given twice")
    guard = None          # loaded first: a wrong --guard fails before the models load
    if cfg.guard is not None:
        from chatsmith.serve.guard import Guard

        guard = Guard(cfg.guard, cfg.guard_threshold, cfg.guard_refusal, device=cfg.device)
    metrics = ServeMetrics()
    process = model_process(cfg)
    served = [ServedModel.load(path, device=cfg.device, template=cfg.template, max_batch=cfg.max_batch,
                               max_queue=cfg.max_queue, metrics=metrics, model_id=mid, process=process,
                               process_threads=model_threads)
              for path, mid in zip(cfg.models, ids)]
    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get(API_KEY_ENV) or None
    store = None
    if cfg.feedback is not None:
        from chatsmith.serve.feedback import FeedbackStore

        store = FeedbackStore(cfg.feedback)
    return create_app(served, api_key=api_key, max_body_bytes=cfg.max_body_bytes,
                      max_new_tokens=cfg.max_new_tokens, metrics=metrics, feedback=store, guard=guard)


def model_process(cfg: ServeConfig) -> bool:
    """Whether each model decodes in a process of its own (``--scheduler``; a forked process cannot
    carry a CUDA or MPS context, so those devices decode in a thread, and ``auto`` forks on Linux only:
    macOS libraries are not fork-safe)."""
    from chatsmith.utils import resolve_device

    on_cpu = resolve_device(cfg.device) == "cpu"
    if cfg.scheduler == "process" and not on_cpu:
        raise ChatsmithError(f"--scheduler process: the model runs on {resolve_device(cfg.device)}, and a model "
                             "process is forked, which only CPU models survive; use --scheduler thread or auto")
    return cfg.scheduler == "process" or (cfg.scheduler == "auto" and on_cpu and sys.platform.startswith("linux"))


def serve(cfg: ServeConfig) -> int:
    """`chatsmith serve`: load the models and run uvicorn until Ctrl-C."""
    import torch
    import uvicorn

    from chatsmith.utils import resolve_device

    if cfg.threads < 0:
        raise ChatsmithError(f"--threads: expected >= 0, got {cfg.threads}")
    threads = cfg.threads or max(1, (os.cpu_count() or 2) - 1)
    process = model_process(cfg)
    if resolve_device(cfg.device) == "cpu":
        # with model processes this one only serves HTTP (and a --guard): one thread, so that it starts no
        # OpenMP pool, which the forked model processes (using `threads` each) could not use
        torch.set_num_threads(1 if process else threads)
    app = build_app(cfg, model_threads=threads if process else 1)
    # the loaded models, transformers and torch are a large graph of long-lived objects: kept out of the
    # cyclic garbage collector, its full collections no longer stall the event loop for a tenth of a second
    gc.collect()
    gc.freeze()
    print(f"chatsmith serve: {', '.join(cfg.models)} on http://{cfg.host}:{cfg.port} "
          f"(OpenAI API at /v1, web chat at /)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0
