"""`chatsmith serve --guard RM_DIR --guard-threshold T` over real HTTP: a tiny reward model judges each chat
reply; thresholds just above and below a reply's own score force a refusal and a pass, streaming and not,
per choice; /metrics counts both outcomes; raw completions are refused on a guarded server.

    python -m pytest tests/test_serve_guard.py -q
"""

from __future__ import annotations

import json

import httpx
import pytest

from chatsmith.errors import ChatsmithError
from chatsmith.serve.app import ServedModel, create_app
from chatsmith.serve.cli import ServeConfig, build_app
from chatsmith.serve.guard import Guard
from servers import running, tiny_chat_model
from test_grpo import write_toy_dirs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MESSAGES = [{"role": "user", "content": "What is the capital of Germany?"}]
REFUSAL = "No, sorry."


def ask(url: str, stream: bool, **extra) -> tuple[list[str], list[str]]:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": stream, **extra}
    if not stream:
        out = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        return [c["message"]["content"] for c in out["choices"]], [c["finish_reason"] for c in out["choices"]]
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        for choice in json.loads(line[len("data: "):])["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
    return [texts[i] for i in sorted(texts)], [finish[i] for i in sorted(finish)]


def guard_count(url: str, outcome: str) -> float:
    name = f'chatsmith_guard_replies_total{{model="tiny",outcome="{outcome}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(url + "/metrics").text.splitlines()
               if line.startswith(name))


def test_guard_refuses_below_the_threshold_and_passes_above(tmp_path):
    _, rm_dir, _ = write_toy_dirs(tmp_path)
    served = ServedModel.load(str(tiny_chat_model(tmp_path / "chat")), device="cpu", model_id="tiny")
    guard = Guard(str(rm_dir), threshold=-1e9, refusal=REFUSAL, device="cpu")
    with running(create_app([served], guard=guard)) as url:
        (reply,), (reason,) = ask(url, stream=False)
        assert reply.strip() and reason in ("stop", "length")
        score = guard.scores(MESSAGES, [reply])[0]

        guard.threshold = score + 0.01                   # just above the reply's score: refused
        assert ask(url, stream=False) == ([REFUSAL], ["content_filter"])
        assert ask(url, stream=True) == ([REFUSAL], ["content_filter"])
        assert guard_count(url, "refused") == 2

        guard.threshold = score - 0.01                   # just below: the reply itself, streamed or not
        assert ask(url, stream=False) == ([reply], [reason])
        assert ask(url, stream=True) == ([reply], [reason])
        assert guard_count(url, "passed") == 3

        # several choices are judged one by one: a threshold between two samples' scores splits them
        guard.threshold = -1e9
        texts, _ = ask(url, stream=False, n=4, temperature=1.0, seed=3)
        scores = guard.scores(MESSAGES, texts)
        low, high = min(scores), max(scores)
        assert low < high
        guard.threshold = (low + high) / 2
        got, reasons = ask(url, stream=True, n=4, temperature=1.0, seed=3)
        assert got == [REFUSAL if s < guard.threshold else t for t, s in zip(texts, scores)]
        assert [r == "content_filter" for r in reasons] == [s < guard.threshold for s in scores]

        raw = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 3})
        assert raw.status_code == 403 and raw.json()["error"]["code"] == "guarded"


def test_guard_flags(tmp_path):
    model = tiny_chat_model(tmp_path / "chat")
    with pytest.raises(ChatsmithError, match="--guard .*no_such_rm: model directory not found"):
        build_app(ServeConfig(models=[str(model)], device="cpu", guard=str(tmp_path / "no_such_rm")))
    _, rm_dir, _ = write_toy_dirs(tmp_path)
    with pytest.raises(ChatsmithError, match="--guard-threshold"):
        build_app(ServeConfig(models=[str(model)], device="cpu", guard=str(rm_dir), guard_threshold=float("nan")))
