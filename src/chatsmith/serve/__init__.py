"""Serving: `chatsmith serve MODEL_DIR ...`, an OpenAI-compatible API with continuous batching.

    chatsmith serve runs/demo/ppo --port 8000

Modules: `cli` (ServeConfig, the command), `app` (the FastAPI routes, auth, errors), `protocol` (request
checks and the OpenAI error shape), `scheduler` (one thread per model: requests join and leave the
running batch between decode steps, through `chatsmith.generate.continuous`, the decode loop the RL
rollouts share), `metrics` (Prometheus), `page` (the web page at `/`: chat, compare, label; `page.html`),
`feedback` (human judgments and pairs queued for judging in SQLite, `POST /v1/feedback`,
`GET /v1/feedback/pairs`), `export` (`chatsmith feedback export`), `guard` (`--guard`: a reward model
replaces low-scored replies with a refusal).
Tests: `python -m pytest tests/test_serve.py tests/test_serve_batch.py tests/test_feedback.py
tests/test_serve_guard.py tests/test_browser.py -q`.
"""
