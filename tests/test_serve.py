"""Tests for `chatsmith serve` over real HTTP: a uvicorn server on 127.0.0.1 (a free port, in a thread)
serving a tiny chat model, driven by the official `openai` client and by raw httpx requests.

    python -m pytest tests/test_serve.py -q

Covers: /v1/models, /health, chat and raw completions (streaming and not), usage counts, stop strings,
same seed same text, n choices, concurrent requests whose outputs equal the same requests sent one at a
time, every kind of bad input (status + OpenAI error JSON, then a good request still works), the bounded
queue (503 + Retry-After), a client that disconnects, API-key auth, /metrics, the command line.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

pytest.importorskip("openai")
import openai  # noqa: E402

from chatsmith.chat.reasoning import split_reasoning  # noqa: E402
from chatsmith.chat.render import render_prompt  # noqa: E402
from chatsmith.generate import generate  # noqa: E402
from chatsmith.generate.engine import chat_sampling_config  # noqa: E402
from chatsmith.serve.app import ServedModel, create_app  # noqa: E402
from chatsmith.serve.cli import ServeConfig, build_app  # noqa: E402
from conftest import SAMPLE_TEXTS  # noqa: E402
from servers import CONTEXT, running, tiny_chat_model  # noqa: E402

BODY_LIMIT = 20_000
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("serve") / "chat")


@pytest.fixture(scope="module", params=["thread", "process"])
def server(model_dir, request):
    """The app with the model decoding in a thread of this process, or in a model process of its own
    (`chatsmith.serve.worker`, what `chatsmith serve` runs on the CPU): every test below runs on both."""
    served = ServedModel.load(str(model_dir), device="cpu", max_batch=8, max_queue=64, model_id="tiny",
                              process=request.param == "process")
    app = create_app([served], max_body_bytes=BODY_LIMIT, max_new_tokens=200)
    with running(app) as url:
        yield url, served


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _greedy_reply(served, messages, max_tokens):
    """What the sampling engine itself replies (greedy), the reference for the server's answers."""
    ids = render_prompt(messages, served.tokenizer, served.fmt)
    cfg = chat_sampling_config(served.fmt, served.tokenizer, max_new_tokens=max_tokens, temperature=0.0,
                               logprobs=False)
    cfg.stop_token_ids = tuple(cfg.stop_token_ids) + (served.tokenizer.eos_token_id,)
    out = generate(served.model, served.tokenizer, [ids], cfg)
    return ids, out


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# ----------------------------------------------------------------------------- the API

def test_models_health_and_page(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(url + "/health").json() == {"status": "ok", "models": ["tiny"]}
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text      # nothing fetched from elsewhere
    for part in ('id="system"', 'id="temperature"', 'id="model"', 'id="new"', "/v1/chat/completions",
                 "stream: true", "localStorage", 'id="view-compare"', 'id="view-label"', "/v1/feedback/pairs",
                 'data-choice="both_bad"'):
        assert part in page.text


def test_chat_matches_engine_with_usage_streaming_and_not(server, client):
    _, served = server
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of Germany? <|im_end|>"}]
    ids, ref = _greedy_reply(served, messages, 40)
    # the typed <|im_end|> stays plain text: more than one token, not the end-of-turn token
    assert ids.count(served.tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    assert out.choices[0].message.content == ref.texts[0]
    assert out.choices[0].finish_reason == ("stop" if ref.finished[0] else "length")
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(ref.sequences[0])
    assert out.usage.total_tokens == len(ids) + len(ref.sequences[0])

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.texts[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == len(ids)


# ChatML whose generation prompt opens a think block (as DeepSeek-R1's does): the reply starts inside it.
THINKING_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")


def test_thinking_is_served_as_reasoning_content(model_dir):
    """Text up to `</think>` comes back as `reasoning_content` (whole and streamed), the rest as `content`:
    both equal the engine's own greedy text split there (chat/reasoning.py)."""
    served = ServedModel.load(str(model_dir), device="cpu", template=THINKING_CHATML, model_id="tiny")
    with running(create_app([served], max_new_tokens=200)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for question in ("Why is the sky blue?", "Say </think> and then Paris."):
            messages = [{"role": "user", "content": question}]
            ids, ref = _greedy_reply(served, messages, 30)
            assert served.tokenizer.decode(ids).endswith("<think>\n")
            reasoning, reply = split_reasoning(ref.texts[0], started=True)
            out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
            message = out.choices[0].message
            assert (message.model_extra["reasoning_content"], message.content) == (reasoning, reply)
            chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=30,
                                                         temperature=0, stream=True))
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == reasoning
            assert "".join(d.content or "" for d in deltas) == reply


def test_raw_stream_ends_with_done(server):
    url, _ = server
    body = {"model": "tiny", "prompt": "The capital of France", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_completion_stop_string_seed_and_n(server, client):
    _, served = server
    prompt = "Python is a snake. Java is"
    kw = dict(model="tiny", prompt=prompt, max_tokens=40, temperature=1.0, seed=7)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    other = client.completions.create(**dict(kw, seed=8))
    text = first.choices[0].text
    assert again.choices[0].text == text and other.choices[0].text != text
    assert first.usage.prompt_tokens == len(served.tokenizer.encode(prompt, add_special_tokens=False))
    assert first.usage.completion_tokens == 40 and first.choices[0].finish_reason == "length"
    # a stop string from the middle of that text: the same draw, cut just before the stop string
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].strip())
    cut = client.completions.create(**kw, stop=[stop, "never-seen-xyz"])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    many = client.completions.create(**dict(kw, n=3))
    texts = [c.text for c in many.choices]
    assert [c.index for c in many.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert many.usage.completion_tokens == 120 and many.usage.prompt_tokens == 3 * first.usage.prompt_tokens
    assert texts == [c.text for c in client.completions.create(**dict(kw, n=3)).choices]


def test_reply_is_cut_at_the_context(server, client):
    _, served = server
    prompt, length = "Paris", 1
    while length < CONTEXT - 30:          # a prompt that leaves room for about 30 tokens
        prompt += " is in Europe. Paris"
        length = len(served.tokenizer.encode(prompt, add_special_tokens=False))
    assert CONTEXT - 40 < length < CONTEXT
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=200, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == CONTEXT - length


def test_concurrent_requests_equal_sequential(server, client):
    """64 streaming requests of mixed prompt lengths and max_tokens, greedy or seeded sampling, sent at once:
    all complete, and each answer equals the same request sent alone."""
    url, _ = server
    rng = random.Random(1)
    requests = []
    for i in range(64):
        words = " ".join(rng.choice(SAMPLE_TEXTS).split()[: rng.randint(1, 40)])
        sampled = i % 4 == 0
        requests.append(dict(model="tiny", messages=[{"role": "user", "content": words}],
                             max_tokens=rng.randint(1, 32), temperature=0.8 if sampled else 0.0,
                             seed=i if sampled else None, stream=True))

    def ask(req):
        chunks = list(client.chat.completions.create(**req))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), \
            [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    alone = [ask(r) for r in requests]
    before = httpx.get(url + "/metrics").text
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(ask, requests))
    after = httpx.get(url + "/metrics").text
    assert len(together) == 64 and together == alone
    assert {reason for _, reason in alone} == {"stop", "length"}       # some replies ended on <|im_end|>
    steps = _metric(after, "chatsmith_decode_steps_total") - _metric(before, "chatsmith_decode_steps_total")
    rows = _metric(after, "chatsmith_decode_rows_total") - _metric(before, "chatsmith_decode_rows_total")
    assert rows > 2 * steps        # requests really shared decode steps


# ----------------------------------------------------------------------------- bad input

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
CHAT = "/v1/chat/completions"


def _bad_cases():
    long_message = " ".join(["capital of France"] * 200)
    return [
        ("malformed json", CHAT, b'{"model": "tiny", "messages": [', {}, 400, "invalid_json"),
        ("not an object", CHAT, b"[1, 2]", {}, 400, "invalid_json"),
        ("non-utf8 body", CHAT, b'{"model": "tiny", "x": "\xff\xfe"}', {}, 400, "invalid_encoding"),
        ("unknown model", CHAT, dict(GOOD, model="gpt-9"), {}, 404, "model_not_found"),
        ("unknown role", CHAT, dict(GOOD, messages=[{"role": "wizard", "content": "hi"}]), {}, 400, "invalid_value"),
        ("empty messages", CHAT, dict(GOOD, messages=[]), {}, 400, "invalid_value"),
        ("missing messages", CHAT, {"model": "tiny"}, {}, 400, "invalid_type"),
        ("content not text", CHAT, dict(GOOD, messages=[{"role": "user", "content": 5}]), {}, 400, "invalid_type"),
        ("prompt too long", CHAT, dict(GOOD, messages=[{"role": "user", "content": long_message}]), {}, 400,
         "context_length_exceeded"),
        ("max_tokens zero", CHAT, dict(GOOD, max_tokens=0), {}, 400, "invalid_value"),
        ("max_tokens negative", CHAT, dict(GOOD, max_tokens=-5), {}, 400, "invalid_value"),
        ("max_tokens absurd", CHAT, dict(GOOD, max_tokens=10**9), {}, 400, "invalid_value"),
        ("max_tokens text", CHAT, dict(GOOD, max_tokens="many"), {}, 400, "invalid_type"),
        ("temperature too high", CHAT, dict(GOOD, temperature=5), {}, 400, "invalid_value"),
        ("top_p zero", CHAT, dict(GOOD, top_p=0), {}, 400, "invalid_value"),
        ("n too large", CHAT, dict(GOOD, n=1000), {}, 400, "invalid_value"),
        ("stop not text", CHAT, dict(GOOD, stop=[1]), {}, 400, "invalid_type"),
        ("body too large", CHAT, dict(GOOD, pad="x" * (BODY_LIMIT + 10)), {}, 413, "body_too_large"),
        ("chunked body too large", CHAT, "chunked", {}, 413, "body_too_large"),
        ("empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, {}, 400, "invalid_value"),
        ("unknown route", "/v1/nothing", GOOD, {}, 404, None),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_gets_error_json_and_server_keeps_serving(server, case):
    url, _ = server
    _, path, body, headers, status, code = case
    if body == "chunked":      # no Content-Length: the limit must hold while the body streams in
        content = (b"x" * 4096 for _ in range(BODY_LIMIT // 4096 + 2))
        response = httpx.post(url + path, content=content, headers={"content-type": "application/json"})
    elif isinstance(body, bytes):
        response = httpx.post(url + path, content=body, headers={"content-type": "application/json", **headers})
    else:
        response = httpx.post(url + path, json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error["code"] == code
    good = httpx.post(url + CHAT, json=GOOD)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"


def test_openai_client_raises_on_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert "wizard" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_full_queue_gets_503_with_retry_after(model_dir):
    served = ServedModel.load(str(model_dir), device="cpu", max_batch=1, max_queue=1, model_id="tiny")
    # a stand-in thread so the app does not start the scheduler yet: requests stay queued, deterministically
    served.scheduler.thread = threading.Thread(target=lambda: None)
    with running(create_app([served], max_new_tokens=250)) as url:
        body = {"model": "tiny", "prompt": "The capital of France is Paris.", "max_tokens": 5}
        with ThreadPoolExecutor(2) as pool:
            queued = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60) for _ in range(2)]
            deadline = time.monotonic() + 30
            while served.scheduler.queue_depth < 2:          # one for the free batch slot, one waiting
                assert time.monotonic() < deadline
                time.sleep(0.01)
            busy = httpx.post(url + "/v1/completions", json=body)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "queue_full"
            served.scheduler.start()
            assert [f.result().status_code for f in queued] == [200, 200]
        assert httpx.post(url + "/v1/completions", json=body).status_code == 200


def test_disconnected_client_is_cancelled(server):
    url, served = server
    body = {"model": "tiny", "prompt": "Hello, how can I help", "max_tokens": 200, "n": 16, "stream": True,
            "temperature": 1.0, "seed": 1}
    before = _metric(httpx.get(url + "/metrics").text, "chatsmith_generated_tokens_total")
    with httpx.stream("POST", url + "/v1/completions", json=body) as response:
        next(response.iter_lines())                  # the first piece arrived: generation is running
    deadline = time.monotonic() + 30
    while served.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not served.scheduler.running
    generated = _metric(httpx.get(url + "/metrics").text, "chatsmith_generated_tokens_total") - before
    assert generated < 16 * 200                      # the 16 sequences stopped early
    assert httpx.post(url + CHAT, json=GOOD).status_code == 200


# ----------------------------------------------------------------------------- auth, metrics, CLI

def test_api_key_auth(model_dir, monkeypatch):
    monkeypatch.setenv("CHATSMITH_API_KEY", "s3cret")
    app = build_app(ServeConfig(models=[str(model_dir)], device="cpu"))      # key from the environment
    with running(app) as url:
        model = str(model_dir).rstrip("/")
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            response = httpx.post(url + CHAT, json=body, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200          # health and metrics stay open
        assert httpx.post(url + CHAT, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(**body).choices[0].message.role == "assistant"


def test_no_api_key_means_open(server):
    url, _ = server
    assert httpx.post(url + CHAT, json=GOOD, headers={"Authorization": "Bearer anything"}).status_code == 200


def test_metrics(server):
    url, _ = server
    httpx.post(url + CHAT, json=GOOD)
    httpx.post(url + CHAT, json=dict(GOOD, max_tokens=0))
    text = httpx.get(url + "/metrics").text
    assert 'chatsmith_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'chatsmith_requests_total{route="/v1/chat/completions",status="400"}' in text
    for name in ('chatsmith_queue_depth{model="tiny"}', 'chatsmith_running_batch_size{model="tiny"}',
                 'chatsmith_time_to_first_token_seconds_bucket{le="0.005",model="tiny"}',
                 'chatsmith_request_latency_seconds_count{model="tiny"}'):
        assert name in text
    assert _metric(text, 'chatsmith_time_to_first_token_seconds_count{model="tiny"}') >= 1
    assert _metric(text, 'chatsmith_generated_tokens_total{model="tiny"}') >= 3


def test_cli_help_and_missing_model(capsys):
    from chatsmith.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0 and "--max-batch" in capsys.readouterr().out
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""),
                                                                  "src"] if p))
    bad = subprocess.run([sys.executable, "-m", "chatsmith", "serve", "/no/such/model"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "model directory not found" in bad.stderr


def test_text_chunks_are_the_generic_chunks():
    """The per-token chunks built from a run's encoded head are byte for byte the generic ones."""
    from types import SimpleNamespace

    from chatsmith.serve.app import chunk_event, chunk_head, text_chunk

    for chat in (True, False):
        served = SimpleNamespace(id='runs/"odd" ü model')
        run = SimpleNamespace(id="chatcmpl-abc", created=1700000000, served=served, chat=chat,
                              chunk_head=chunk_head("chatcmpl-abc", chat, 1700000000, served.id))
        for index, text in ((0, "hello"), (3, ' "quoted" \\ back\nnew line'), (12, "üñí ✓ \u2028"), (1, "")):
            assert text_chunk(run, index, text) == chunk_event(run, chat, index, text, None)
