"""An OpenAI-compatible HTTP server over the continuous-batching engine (Starlette + uvicorn):
`/v1/models`, `/v1/completions`, `/v1/chat/completions` (server-sent events with `stream`; a last chunk
with the usage counts under `stream_options.include_usage`), and a chat page at `/`. Chat prompts use the
model's own chat template where its tokenizer has one (an imported model's), else "role: content" lines.

One thread runs the engine (`EngineLoop`): it admits what the HTTP handlers submit, steps while there
is work, and hands each new token to its request's asyncio queue. A client that disconnects
mid-stream cancels its request, which frees its KV blocks at once. Errors use OpenAI's format:
{"error": {"message", "type", "param", "code"}} with a 4xx status; a full queue is a 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.checks import ConfigError
from scratchlm.errors import ScratchLMError
from scratchlm.infer.generate import Sampling
from scratchlm.serve.engine import Engine

CHAT_TEMPLATE = "{system}{turns}assistant:"  # each turn: "{role}: {content}\n"; the model continues after "assistant:"


def render_chat(messages: list[dict], tokenizer=None) -> str:
    """The prompt for `messages`: the tokenizer's chat template if it has one, else the default one
    ("role: content" lines, then "assistant:")."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages)
        except ScratchLMError as exc:  # e.g. the template's raise_exception() for an unknown role
            raise BadRequest(f"messages: {exc}", "messages") from None
    turns = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return CHAT_TEMPLATE.format(system="", turns=turns)


def sendable(text: str, stops) -> int:
    """How much of `text` can be streamed: all but a suffix that might be the start of a stop string
    (once sent, text cannot be taken back when the stop string completes)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return len(text) - hold


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind="invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


@dataclass
class Stream:
    """What the engine thread sends one HTTP request: (text piece, finish reason or None) items."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent: int = 0  # characters of the result's text already sent
    completion_tokens: int = 0

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineLoop:
    """The engine on its own thread; submit/cancel from any thread."""

    def __init__(self, engine: Engine, max_queue: int = 256) -> None:
        self.engine, self.max_queue = engine, max_queue
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.streams: dict[int, Stream] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="scratchlm-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: str, sampling: Sampling, stream: Stream) -> int:
        with self.lock:
            if len(self.engine.waiting) >= self.max_queue:
                raise BadRequest(f"the queue is full ({self.max_queue} requests waiting): retry later", None, 429,
                                 "rate_limit_exceeded")  # fmt: skip
            try:
                request_id = self.engine.add_request(prompt, sampling)
            except ScratchLMError as exc:
                raise BadRequest(str(exc), "prompt") from None
            self.streams[request_id] = stream
        self.wake.set()
        return request_id

    def cancel(self, request_id: int) -> None:
        with self.lock:
            self.engine.cancel(request_id)
            self.streams.pop(request_id, None)

    def stop(self) -> None:
        """Cancel what is in flight (its clients get finish_reason "cancelled") and end the thread."""
        with self.lock:
            self.stopping = True
            for request_id, stream in list(self.streams.items()):
                self.engine.cancel(request_id)
                stream.put(("", "cancelled"))
            self.streams.clear()
        self.wake.set()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(timeout=0.5)
            while True:
                with self.lock:
                    if self.stopping or not self.engine.has_work():
                        self.wake.clear()
                        break
                    self.engine.step()
                    for request_id, stream in list(self.streams.items()):
                        r = self.engine.requests[request_id]
                        text = r.result.text
                        end = len(text) if r.finished else sendable(text, r.sampling.stop)
                        piece, stream.sent = text[stream.sent : end], max(stream.sent, end)
                        stream.completion_tokens = len(r.result.token_ids)
                        if r.finished:
                            reason = "stop" if r.result.stop_reason in ("eot", "stop string") else "length"
                            stream.put((piece, reason))
                            del self.streams[request_id]
                            del self.engine.requests[request_id]
                        elif piece:
                            stream.put((piece, None))
                # let the event loop run between steps (admit new requests, flush the streams): a thread
                # that re-takes the GIL and the lock at once would send every token in one burst at the end
                time.sleep(0.0002)


def _number(body: dict, name: str, default, kind, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"{name}: expected {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        upper = high if high is not None else "inf"
        raise BadRequest(f"{name}: expected a value in [{low}, {upper}], got {value}", name)
    return kind(value)


def parse_sampling(body: dict, context_length: int) -> tuple[Sampling, int]:
    """(sampling parameters, n) from an OpenAI request body."""
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"stop: expected a string or a list of non-empty strings, got {stop!r}", "stop")
    try:
        sampling = Sampling(
            temperature=_number(body, "temperature", 1.0, float, 0, 2),
            top_p=_number(body, "top_p", 1.0, float, 0, 1),
            top_k=_number(body, "top_k", 0, int, 0),
            max_new_tokens=_number(body, "max_tokens", 16, int, 1, context_length),
            seed=_number(body, "seed", None, int, 0),
            stop=tuple(stop),
        )
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None
    return sampling, _number(body, "n", 1, int, 1, 16)


def create_app(engine: Engine, model_name: str, max_queue: int = 256):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    loop_holder: dict[str, EngineLoop] = {}

    def engine_loop() -> EngineLoop:
        if "loop" not in loop_holder:
            loop_holder["loop"] = EngineLoop(engine, max_queue)
        return loop_holder["loop"]

    def error(exc: BadRequest) -> JSONResponse:
        body = {"error": {"message": str(exc), "type": exc.kind, "param": exc.param, "code": None}}
        return JSONResponse(body, status_code=exc.status)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if body.get("model", model_name) != model_name:
            raise BadRequest(f"the model {body['model']!r} does not exist (this server has {model_name!r})",
                             "model", 404, "model_not_found")  # fmt: skip
        return body

    async def models(request: Request) -> JSONResponse:
        created = int(time.time())
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                                          "owned_by": "scratchlm"}]})  # fmt: skip

    async def complete(request: Request, chat: bool):
        try:
            body = await read_body(request)
            if chat:
                messages = body.get("messages")
                if (
                    not isinstance(messages, list)
                    or not messages
                    or not all(
                        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages
                    )
                ):
                    raise BadRequest("messages: expected a non-empty list of {role, content} objects", "messages")
                prompt = render_chat(messages, engine.tokenizer)
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str) or not prompt:
                    raise BadRequest("prompt: expected a non-empty string", "prompt")
            sampling, n = parse_sampling(body, engine.model.config.context_length)
            options = body.get("stream_options") or {}
            if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
                raise BadRequest(f"stream_options: expected {{\"include_usage\": true|false}}, got {options!r}",
                                 "stream_options")  # fmt: skip
            runner, aio = engine_loop(), asyncio.get_running_loop()
            streams, ids = [], []
            for i in range(n):
                seeded = sampling
                if sampling.seed is not None:  # n samples, each reproducible
                    seeded = Sampling(**{**vars(sampling), "seed": sampling.seed + i})
                streams.append(Stream(aio))
                ids.append(runner.submit(prompt, seeded, streams[-1]))
        except BadRequest as exc:
            return error(exc)
        prompt_tokens = len(engine.tokenizer.encode(prompt))
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict:
            completion = sum(stream.completion_tokens for stream in streams)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}  # fmt: skip

        def choice(index: int, text: str, reason, delta: bool) -> dict:
            if not chat:
                return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
            message = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
            return {"index": index, ("delta" if delta else "message"): message, "finish_reason": reason}

        if body.get("stream"):

            async def events():
                finished = 0
                try:
                    merged: asyncio.Queue = asyncio.Queue()

                    async def pump(index: int, stream: Stream) -> None:
                        while True:
                            piece, reason = await stream.queue.get()
                            await merged.put((index, piece, reason))
                            if reason is not None:
                                return

                    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
                    while finished < n:
                        index, piece, reason = await merged.get()
                        finished += reason is not None
                        chunk = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                                 "model": model_name, "choices": [choice(index, piece, reason, True)]}  # fmt: skip
                        yield f"data: {json.dumps(chunk)}\n\n"
                    if options.get("include_usage"):  # as OpenAI sends it: no choices, the request's usage
                        chunk = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                                 "model": model_name, "choices": [], "usage": usage()}  # fmt: skip
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # the client went away (or we are done): nothing is left running
                    for task in tasks:
                        task.cancel()
                    for request_id in ids:
                        runner.cancel(request_id)

            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            outputs = []
            for stream in streams:
                text, reason = "", None
                while reason is None:
                    piece, reason = await stream.queue.get()
                    text += piece
                outputs.append((text, reason))
        finally:
            for request_id in ids:
                runner.cancel(request_id)
        return JSONResponse({
            "id": rid, "object": kind, "created": created, "model": model_name,
            "choices": [choice(i, t, r, False) for i, (t, r) in enumerate(outputs)], "usage": usage(),
        })  # fmt: skip

    async def completions(request: Request):
        return await complete(request, chat=False)

    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse((Path(__file__).parent / "chat.html").read_text(encoding="utf-8"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if "loop" in loop_holder:  # SIGTERM / Ctrl-C: in-flight requests end as "cancelled"
            loop_holder["loop"].stop()

    routes = [
        Route("/", page),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
