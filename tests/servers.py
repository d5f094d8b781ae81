"""Helpers for the tests that start a real `chatsmith serve` on 127.0.0.1: a free port, uvicorn in a thread,
a server subprocess waited for until /health answers, and the tiny chat model they serve.

    from servers import running, tiny_chat_model
    with running(create_app([...])) as url: ...
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time

import httpx
import torch

from chatsmith.model import build_tokenizer, create_model, save_model
from conftest import SAMPLE_TEXTS

CONTEXT = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_chat_model(folder, context: int = CONTEXT, seed: int = 0):
    """A hidden-64 chatml Llama saved in ``folder``. The induction init copies earlier context, so greedy
    replies differ by prompt and some end with <|im_end|> (a plain random model repeats one token whatever
    it is asked). Another ``seed`` gives another model with the same tokenizer."""
    tok = build_tokenizer(SAMPLE_TEXTS, 400, "chatml")
    torch.manual_seed(seed)
    model = create_model(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=128, max_position_embeddings=context), tok, init="induction")
    return save_model(model, tok, folder)


@contextlib.contextmanager
def running(app):
    """Run ``app`` with uvicorn in a thread on a free port; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_for_health(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    """Wait until the server subprocess ``proc`` answers GET /health (fails with its stderr if it dies)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
        assert time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
