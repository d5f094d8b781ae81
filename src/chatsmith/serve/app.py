"""The FastAPI app of `chatsmith serve`: OpenAI-compatible routes over one scheduler per model.

    app = create_app([ServedModel.load("runs/sft")], api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: `GET /v1/models`, `POST /v1/chat/completions` (messages rendered with the model's own chat
template), `POST /v1/completions` (raw text), `GET /health`, `GET /metrics` (Prometheus), `GET /` (the
web chat page), and with a feedback store `POST /v1/feedback` (a human judgment of two responses) and
`GET /v1/feedback/pairs` (the pairs queued for judging that wait for one; both 404 when off). With an API key every `/v1` route needs `Authorization: Bearer KEY` (401 otherwise,
compared in constant time). Streaming answers are server-sent events ending with `data: [DONE]`: a chunk
per choice and write, with the text generated since the last write (one token's piece while the writer
keeps up). A chat reply's thinking (`<think>…</think>`) comes back as `reasoning_content`, whole or as its own
deltas, the rest as `content` (chat/reasoning.py). With a guard (`chatsmith.serve.guard`) every chat reply is
judged by a reward model once complete. A model's scheduler is a thread here or, for CPU models under
`chatsmith serve`, a model process of its own (`chatsmith.serve.worker`).

Tests: `python -m pytest tests/test_serve.py tests/test_serve_worker.py -q`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatsmith.chat.reasoning import ReasoningSplitter, opens_reasoning, split_reasoning
from chatsmith.errors import ChatsmithError
from chatsmith.serve.metrics import CONTENT_TYPE, ServeMetrics
from chatsmith.serve.protocol import (APIError, SamplingParams, error_body, parse_messages, parse_prompts,
                                      parse_sampling, read_json_body)
from chatsmith.generate.row_sampling import RowSampling, choice_seed
from chatsmith.serve.scheduler import Event, Job, QueueFull, Scheduler

__all__ = ["ServedModel", "create_app"]

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/feedback",
          "/v1/feedback/pairs")


@dataclass
class ServedModel:
    """A loaded model, its chat format (None for a base model without template) and its scheduler."""

    id: str
    model: Any
    tokenizer: Any
    fmt: Any
    context: int
    scheduler: Any            # a Scheduler (a thread here) or a worker.ProcessScheduler (a model process)
    created: int
    stops: dict = field(default_factory=dict, repr=False)   # chat? -> (stop ids, stop strings), built once

    @classmethod
    def load(cls, path: str, device: str = "auto", template: str | None = None, max_batch: int = 16,
             max_queue: int = 64, metrics: ServeMetrics | None = None, model_id: str | None = None,
             process: bool = False, process_threads: int = 1) -> "ServedModel":
        """``process``: decode in a model process of its own (`chatsmith.serve.worker`, CPU models only)
        instead of a thread of the server's process, with ``process_threads`` torch threads (see
        `worker.ProcessScheduler` on when more than one is safe)."""
        from chatsmith.model import load_model, max_context_length

        loaded = load_model(path, device=device, template=template, require_template=False)
        name = model_id or str(path).rstrip("/")
        if process:
            from chatsmith.serve.worker import ProcessScheduler

            scheduler = ProcessScheduler(loaded.model, loaded.tokenizer, max_batch=max_batch, max_queue=max_queue,
                                         metrics=metrics, name=name, threads=process_threads)
        else:
            scheduler = Scheduler(loaded.model, loaded.tokenizer, max_batch=max_batch, max_queue=max_queue,
                                  metrics=metrics, name=name)
        return cls(name, loaded.model, loaded.tokenizer, loaded.fmt,
                   max_context_length(loaded.model, loaded.tokenizer), scheduler, int(time.time()))

    def stop_ids(self, chat: bool) -> frozenset[int]:
        return self.stop_settings(chat)[0]

    def stop_settings(self, chat: bool) -> tuple[frozenset[int], tuple[str, ...]]:
        """(stop token ids, the template's stop strings) of a chat or raw request, worked out once (the
        ids tokenize the stop strings: a visible share of a short request's handling)."""
        if chat not in self.stops:
            ids = set(self.fmt.stop_token_ids(self.tokenizer)) if chat and self.fmt is not None else set()
            if self.tokenizer.eos_token_id is not None:
                ids.add(int(self.tokenizer.eos_token_id))
            strings = tuple(self.fmt.stop_strings) if chat and self.fmt is not None else ()
            self.stops[chat] = (frozenset(ids), strings)
        return self.stops[chat]


class Gate:
    """ASGI middleware: Bearer auth on `/v1` and request counts by route and status."""

    def __init__(self, app: Any, api_key: str | None, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics
        self.key = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        status = [500]

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key is not None and path.startswith("/v1") and not self._authorized(scope):
                response = JSONResponse(error_body("missing or wrong API key (send Authorization: Bearer KEY)",
                                                   "authentication_error", code="invalid_api_key"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(path if path in ROUTES else "other", str(status[0])).inc()

    def _authorized(self, scope: dict) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest takes the same time wherever the strings differ (no timing leak of the key)
        return hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"


def create_app(models: list[ServedModel], api_key: str | None = None, max_body_bytes: int = 1_000_000,
               max_new_tokens: int = 512, metrics: ServeMetrics | None = None, feedback: Any = None,
               guard: Any = None) -> Any:
    """The ASGI app serving ``models`` (their schedulers start with the app and stop with it).

    ``feedback``: a `chatsmith.serve.feedback.FeedbackStore` that `POST /v1/feedback` writes to (None: off).
    ``guard``: a `chatsmith.serve.guard.Guard` that judges every chat reply (None: off)."""
    from contextlib import asynccontextmanager

    metrics = metrics or ServeMetrics()
    by_id = {m.id: m for m in models}
    for m in models:
        m.scheduler.attach_metrics(metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        for m in models:
            if m.scheduler.thread is None:
                m.scheduler.start()
        yield
        for m in models:
            m.scheduler.stop()

    app = FastAPI(title="chatsmith serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models, app.state.metrics = by_id, metrics

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    def pick_model(data: dict) -> ServedModel:
        name = data.get("model")
        if name is None and len(by_id) == 1:
            return models[0]
        if not isinstance(name, str) or name not in by_id:
            raise APIError(404, f"model {json.dumps(name)[:80]} is not served here; served: {', '.join(by_id)}",
                           param="model", code="model_not_found")
        return by_id[name]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(by_id)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": m.id, "object": "model", "created": m.created,
                                            "owned_by": "chatsmith"} for m in models]}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        from chatsmith.serve.page import page_html

        return HTMLResponse(page_html())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        data = await read_json_body(request, max_body_bytes)
        served = pick_model(data)
        params = parse_sampling(data, served.context, max_new_tokens)
        messages = parse_messages(data)
        if served.fmt is None:
            raise APIError(400, f"model {served.id} has no chat template; use /v1/completions for raw text",
                           param="model", code="no_chat_template")
        from chatsmith.chat.render import render_prompt

        try:
            prompt = render_prompt(messages, served.tokenizer, served.fmt)
        except ChatsmithError as exc:
            raise APIError(400, f"messages: {exc}", param="messages", code="invalid_value") from None
        if guard is not None:
            return await respond_guarded(request, served, prompt, params, messages)
        return await respond(request, served, [prompt], params, chat=True)

    def feedback_store() -> Any:
        if feedback is None:
            raise APIError(404, "feedback is off on this server (start it with chatsmith serve --feedback DB)",
                           "not_found_error", code="feedback_off")
        return feedback

    @app.post("/v1/feedback")
    async def post_feedback(request: Request) -> dict:
        from chatsmith.serve.feedback import FeedbackError, parse_judgment

        store = feedback_store()
        data = await read_json_body(request, max_body_bytes)
        try:
            judgment = parse_judgment(data)
            # the insert fsyncs: run it off the event loop so streaming requests keep flowing meanwhile
            judgment_id = await asyncio.to_thread(store.add, judgment)
        except FeedbackError as exc:
            raise APIError(exc.status, str(exc), param=exc.param,
                           code="already_judged" if exc.status == 409 else "invalid_value") from None
        return {"id": judgment_id, "object": "feedback"}

    @app.get("/v1/feedback/pairs")
    async def pending_pairs(request: Request) -> dict:
        """Pairs queued for judging (label mode) that nobody judged yet, oldest first (`?limit=`, 1-500)."""
        store = feedback_store()
        raw = request.query_params.get("limit", "50")
        if not raw.isdigit() or not 1 <= int(raw) <= 500:
            raise APIError(400, f"limit must be a whole number from 1 to 500, got {raw[:20]!r}", param="limit",
                           code="invalid_value")
        limit = int(raw)
        pairs = await asyncio.to_thread(store.pairs, None, True, limit)
        pending = await asyncio.to_thread(store.pending_count)
        return {"object": "list", "data": [p.public() for p in pairs], "pending": pending}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        if guard is not None:
            raise APIError(403, "this server guards its replies with a reward model, which judges chat replies "
                           "only: use /v1/chat/completions", "permission_error", code="guarded")
        data = await read_json_body(request, max_body_bytes)
        served = pick_model(data)
        params = parse_sampling(data, served.context, max_new_tokens)
        prompts = [served.tokenizer.encode(p, add_special_tokens=False) for p in parse_prompts(data)]
        if any(not ids for ids in prompts):
            raise APIError(400, "'prompt' encodes to no tokens", param="prompt", code="invalid_value")
        return await respond(request, served, prompts, params, chat=False)

    async def respond_guarded(request: Request, served: ServedModel, prompt: list[int], params: SamplingParams,
                              messages: list[dict]) -> Response:
        """A chat answer judged by the guard once complete (streaming: sent when complete, see serve.guard)."""
        run = start_run(served, [prompt], params, chat=True)

        async def judged() -> dict:
            result = await collect(request, run, chat=True)
            choices = result["choices"]
            verdicts = await asyncio.to_thread(guard.check, messages, [c["message"]["content"] for c in choices])
            for choice, verdict in zip(choices, verdicts):
                metrics.guard.labels(served.id, "refused" if verdict.refused else "passed").inc()
                if verdict.refused:
                    choice["message"]["content"], choice["finish_reason"] = verdict.text, "content_filter"
            return result

        if params.stream:
            return StreamingResponse(guarded_events(run, params, judged), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await judged())

    async def respond(request: Request, served: ServedModel, prompts: list[list[int]], params: SamplingParams,
                      chat: bool) -> Response:
        run = start_run(served, prompts, params, chat)
        if params.stream:
            return StreamingResponse(stream_events(run, params, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await collect(request, run, chat))

    def start_run(served: ServedModel, prompts: list[list[int]], params: SamplingParams, chat: bool) -> "Run":
        longest = max(len(p) for p in prompts)
        if longest >= served.context:
            raise APIError(400, f"the prompt is {longest} tokens but the model's context is {served.context} "
                           "tokens; shorten it", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        scheduler = served.scheduler
        if len(prompts) * params.n > scheduler.max_batch + scheduler.max_queue:
            raise APIError(400, f"{len(prompts) * params.n} sequences asked (prompts x n); this server takes at "
                           f"most {scheduler.max_batch + scheduler.max_queue} at once", param="n",
                           code="invalid_value")
        run = Run(served, prompts, params, chat, max_new_tokens)
        run.submit()
        return run

    return Gate(app, api_key, metrics)


class Mailbox:
    """Hands events from scheduler threads to one event loop with at most one wake-up pending.

    A decode step of 32 rows makes 32 events; waking the loop once for each (a self-pipe write and a
    callback each) cost a visible share of a small model's step. Here the first event of a step schedules
    one drain and the others just join the deque.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: deque[tuple[asyncio.Queue, Any]] = deque()
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.items = self.items, deque()
            self.scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The mailbox of ``loop`` (one per event loop)."""
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box


class Run:
    """The jobs of one request (one per prompt and choice) and the queue their events arrive on."""

    def __init__(self, served: ServedModel, prompts: list[list[int]], params: SamplingParams, chat: bool, cap: int):
        self.served, self.params, self.chat = served, params, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        stop_ids, template_stops = served.stop_settings(chat)
        stops = list(params.stop) + list(template_stops)
        self.chunk_head = chunk_head(self.id, chat, self.created, served.id)
        self.prompt_tokens = sum(len(p) for p in prompts) * params.n
        # Chat replies are split into thinking (`reasoning_content`) and reply (`content`), chat/reasoning.py;
        # a prompt whose generation prompt opens the block (DeepSeek-R1's) starts the reply inside it.
        self.thinking_started = [chat and opens_reasoning(served.tokenizer.decode(p[-16:])) for p in prompts]
        self.splitters = [ReasoningSplitter(self.thinking_started[i // params.n])
                          for i in range(len(prompts) * params.n)] if chat else []
        self.jobs: list[Job] = []
        for p, prompt in enumerate(prompts):
            limit = min(params.max_tokens or cap, cap, served.context - len(prompt))
            for c in range(params.n):
                index = p * params.n + c
                sampling = RowSampling(params.temperature, params.top_p, params.top_k, choice_seed(params.seed, c))
                self.jobs.append(Job(prompt, limit, sampling, self._emitter(index), stop_ids,
                                     tuple(dict.fromkeys(stops))))

    def _emitter(self, index: int) -> Callable[[Event], None]:
        box, queue = mailbox(self.loop), self.queue

        def emit(event: Event) -> None:   # called from the scheduler thread
            box.post(queue, (index, event))
        return emit

    def submit(self) -> None:
        try:
            self.served.scheduler.submit(self.jobs)
        except QueueFull as exc:
            raise APIError(503, f"the server is busy ({exc}); retry shortly", "server_busy", code="queue_full",
                           headers={"Retry-After": "1"}) from None

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def events(self) -> AsyncIterator[list[tuple[int, Event]]]:
        """Every event of every job until all are done, in lists of those that arrived together (one
        write per list when streaming); cancels the jobs if the consumer stops early."""
        open_jobs = len(self.jobs)
        try:
            while open_jobs:
                ready = [await self.queue.get()]
                while not self.queue.empty():
                    ready.append(self.queue.get_nowait())
                open_jobs -= sum(event.kind in ("done", "error") for _, event in ready)
                yield ready
        finally:
            if open_jobs:
                self.cancel()


async def collect(request: Request, run: Run, chat: bool) -> dict:
    """The whole (non-streaming) answer; stops the jobs if the client disconnects meanwhile."""
    texts = [[] for _ in run.jobs]
    finish: list[str | None] = [None] * len(run.jobs)
    completion = 0
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    try:
        async for ready in run.events():
            for index, event in ready:
                if event.kind == "text":
                    texts[index].append(event.text)
                elif event.kind == "done":
                    finish[index] = event.finish_reason
                    completion += event.completion_tokens
                else:
                    raise APIError(500, event.text, "server_error")
    finally:
        watcher.cancel()
    choices = []
    for i, parts in enumerate(texts):
        text = "".join(parts)
        if chat:
            reasoning, reply = split_reasoning(text, run.thinking_started[i // run.params.n])
            message = {"role": "assistant", "content": reply}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            choices.append({"index": i, "message": message, "finish_reason": finish[i], "logprobs": None})
        else:
            choices.append({"index": i, "text": text, "finish_reason": finish[i], "logprobs": None})
    return {"id": run.id, "object": "chat.completion" if chat else "text_completion", "created": run.created,
            "model": run.served.id, "choices": choices,
            "usage": {"prompt_tokens": run.prompt_tokens, "completion_tokens": completion,
                      "total_tokens": run.prompt_tokens + completion}}


async def _watch_disconnect(request: Request, run: Run) -> None:
    while True:
        await asyncio.sleep(0.25)
        if await request.is_disconnected():
            run.cancel()
            return


def chunk_event(run: Run, chat: bool, index: int, text: str | None, finish: str | None, role: bool = False) -> str:
    """One server-sent event of a streamed answer: a text piece, or a choice's finish, or (chat) its role."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
    body = {"id": run.id, "object": "chat.completion.chunk" if chat else "text_completion", "created": run.created,
            "model": run.served.id, "choices": [choice]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def chunk_head(run_id: str, chat: bool, created: int, model: str) -> str:
    """The text every streamed chunk of a run starts with, up to its choice's index (encoded once)."""
    head = {"id": run_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [{"index": 0}]}
    return "data: " + json.dumps(head, ensure_ascii=False)[: -len("0}]}")]


def text_chunk(run: Run, index: int, text: str, field: str = "content") -> str:
    """``chunk_event(run, run.chat, index, text, None)`` (the same bytes), from the run's encoded head:
    one of these goes out per token and request, so only the text is encoded here. `field`: the chat delta's
    key, "content" or "reasoning_content"."""
    piece = json.dumps(text, ensure_ascii=False)
    if run.chat:
        return (f'{run.chunk_head}{index}, "delta": {{"{field}": {piece}}}, '
                f'"finish_reason": null, "logprobs": null}}]}}\n\n')
    return f'{run.chunk_head}{index}, "text": {piece}, "finish_reason": null, "logprobs": null}}]}}\n\n'


def chat_text_chunks(run: Run, index: int, text: str | None) -> str:
    """The chunks for a piece of a chat reply (None: the end of it): thinking as `reasoning_content`
    deltas, the reply as `content` ones; text that may be half a `<think>` tag waits for the next piece."""
    splitter = run.splitters[index]
    parts = splitter.feed(text) if text is not None else splitter.finish()
    return "".join(text_chunk(run, index, piece, "reasoning_content" if kind == "reasoning" else "content")
                   for kind, piece in parts)


def usage_event(run: Run, chat: bool, completion: int) -> str:
    usage = {"prompt_tokens": run.prompt_tokens, "completion_tokens": completion,
             "total_tokens": run.prompt_tokens + completion}
    body = {"id": run.id, "object": "chat.completion.chunk" if chat else "text_completion", "created": run.created,
            "model": run.served.id, "choices": [], "usage": usage}
    return f"data: {json.dumps(body)}\n\n"


async def guarded_events(run: Run, params: SamplingParams, judged: Callable) -> AsyncIterator[str]:
    """A guarded chat stream: the role chunks at once, then (once ``judged()`` has the whole answer, checked
    by the guard) each choice's text in one chunk, its finish, usage if asked, [DONE]."""
    for i in range(len(run.jobs)):
        yield chunk_event(run, True, i, None, None, role=True)
    try:
        result = await judged()
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    else:
        for choice in result["choices"]:
            reasoning = choice["message"].get("reasoning_content")
            if reasoning:
                yield text_chunk(run, choice["index"], reasoning, "reasoning_content")
            yield (chunk_event(run, True, choice["index"], choice["message"]["content"], None)
                   + chunk_event(run, True, choice["index"], None, choice["finish_reason"]))
        if params.include_usage:
            yield usage_event(run, True, result["usage"]["completion_tokens"])
    yield "data: [DONE]\n\n"


async def stream_events(run: Run, params: SamplingParams, chat: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per choice with the text it generated since the last write (one token's
    piece while the writer keeps up; when it falls behind, the pieces that queued up meanwhile go out as
    one chunk instead of one chunk each), a last chunk per choice, usage if asked, [DONE]."""
    completion = 0

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        return chunk_event(run, chat, index, text, finish, role)

    if chat:
        for i in range(len(run.jobs)):
            yield chunk(i, None, None, role=True)
    async for ready in run.events():
        parts = []
        pending: dict[int, list[str]] = {}          # choice -> text pieces not written yet, in order

        def flush(index: int, end: bool = False) -> None:
            pieces = pending.pop(index, None)
            if pieces and chat:
                parts.append(chat_text_chunks(run, index, "".join(pieces)))
            elif pieces:
                parts.append(text_chunk(run, index, "".join(pieces)))
            if end and chat:
                parts.append(chat_text_chunks(run, index, None))

        for index, event in ready:
            if event.kind == "text":
                pending.setdefault(index, []).append(event.text)
            elif event.kind == "done":
                flush(index, end=True)
                completion += event.completion_tokens
                parts.append(chunk(index, None if chat else "", event.finish_reason))
            else:
                flush(index)
                parts.append(f"data: {json.dumps(error_body(event.text, 'server_error'))}\n\n")
        for index in list(pending):
            flush(index)
        yield "".join(parts)
    if params.include_usage:
        yield usage_event(run, chat, completion)
    yield "data: [DONE]\n\n"
