"""Serving: `chatsmith serve MODEL_DIR ...`, an OpenAI-compatible API with continuous batching.

    chatsmith serve runs/demo/ppo --port 8000

Modules: `cli` (ServeConfig, the command), `app` (the FastAPI routes, auth, errors), `protocol` (request
checks and the OpenAI error shape), `scheduler` (one thread per model: requests join and leave the
running batch between decode steps, through `chatsmith.generate.continuous`, the decode loop the RL
rollouts share), `metrics` (Prometheus), `page` (the web chat at `/`),
`feedback` (human judgments in SQLite, `POST /v1/feedback`), `export` (`chatsmith feedback export`).
Tests: `python -m pytest tests/test_serve.py tests/test_serve_batch.py tests/test_feedback.py -q`.
"""
