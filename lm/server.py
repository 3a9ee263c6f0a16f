"""`lm serve`: a fine-tuned model behind a real HTTP server (FastAPI on uvicorn).

    lm serve --ckpt runs/chat/best.pt                       # http://127.0.0.1:8000
    curl -s localhost:8000/chat -d '{"message": "What is a token?"}'

    from openai import OpenAI                               # the official client, unchanged
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}])

Endpoints:
    POST /chat                  {"message": ...} -> {"response": ...}, seed 001's endpoint
    POST /v1/chat/completions   OpenAI's chat API; "stream": true sends server-sent events
    POST /v1/completions        OpenAI's (legacy) text completion API, streamed the same way
    GET  /v1/models             the one model served
    GET  /health                status, and what the engine is doing

Every request goes to one `lm.serving.Engine`, which decodes the requests of all clients together
(continuous batching). Conversations are laid out with the chat template the model was fine-tuned
with; with a retriever (RAG-lite) the passages found for the last question go into a system
message. Each finished conversation is appended to `chat_history.jsonl` as one JSON line
({"user", "assistant"} for one exchange, {"messages": [...]} for more), the formats
`lm finetune --data` reads: chats collected today are tomorrow's training data.

Bad requests get a 4xx answer shaped like OpenAI's, {"error": {"message", "type", "param",
"code"}}, and the server goes on serving: 400 for invalid JSON, missing or mistyped fields and
out-of-range settings, prompts that leave no room in the context; 401 without the API key (when
--api_key is set, every endpoint needs `Authorization: Bearer KEY`); 404 for an unknown model;
413 for a body over the size limit; 503 when too many requests wait. A client that disconnects
is cancelled, and its slot in the batch freed, before the next token.
"""


import asyncio
import errno
import hmac
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from .generation import GenerationConfig
from .instructions import chat_template, encode_plain
from .sampling import SamplingError
from .serving import Engine, EngineBusy

MAX_BODY_BYTES = 1 << 20
MAX_STOP_STRINGS = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request the server refuses: its HTTP status and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- chat history ------------------------------------------------------------------------------
class History:
    """Appends one JSON object per line. Each line goes out in one write() to a file opened for
    appending, then fsync: a crash can at worst cut the last line short, and opening the file
    again (here, when the server starts) removes such a half line, so every line is whole."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.repaired = self._repair()

    def _repair(self) -> int:
        """Cut a half line left at the end by a crash; returns the bytes removed."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            step, end = 1 << 16, size
            while end > 0:  # find the last newline, reading backwards
                start = max(0, end - step)
                f.seek(start)
                chunk = f.read(end - start)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    f.truncate(start + cut + 1)
                    return size - (start + cut + 1)
                end = start
            f.truncate(0)
            return size

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)


def history_record(messages: list[dict], answer: str, model_name: str) -> dict:
    """A finished conversation in a format `lm.load_examples` reads (chat or messages)."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1 and len(messages) == 1:
        return {"user": turns[0]["content"], "assistant": answer, "timestamp": stamp, "model": model_name}
    return {"messages": [*messages, {"role": "assistant", "content": answer}], "timestamp": stamp,
            "model": model_name}


# ---- reading request bodies --------------------------------------------------------------------
def _number(body: dict, name: str, low: float, high: float, integer: bool = False, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind}, got {json.dumps(value)[:40]}.", name)
    if not (low <= value <= high):
        raise ApiError(400, f"'{name}' is {value}; it must be between {low} and {high}.", name)
    return value


def _text(value, name: str) -> str:
    """A message content: a string, or OpenAI's list of parts [{"type": "text", "text": ...}]."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in value):
        return "".join(p["text"] for p in value)
    raise ApiError(400, f"'{name}' must be a string (or a list of text parts); got {type(value).__name__}.", name)


class Settings:
    """The server's defaults for generation (seed 001's: 150 new tokens, top-k 200, temperature 0.8)."""

    def __init__(self, max_new_tokens: int = 150, temperature: float = 0.8, top_k: int | None = 200,
                 top_p: float | None = None):
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p


# ---- the app -----------------------------------------------------------------------------------
def create_app(model, *, template="human", model_name: str = "lm", history: str | os.PathLike | None = "chat_history.jsonl",
               api_key: str | None = None, max_batch: int = 16, settings: Settings | None = None,
               system: str | None = None, retriever=None, rag_k: int = 3, rag_budget: int | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_waiting: int = 1024, cuda_graph: bool | None = None):
    """The FastAPI application serving `model` (see the module docstring). `history=None` keeps
    no history. The engine starts with the app and stops with it (`cuda_graph`: see lm.serving.Engine)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException

    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("serving needs the model's tokenizer; load the model with lm.load_model.")
    template = chat_template(template)
    template.check(tokenizer)
    settings = settings or Settings()
    block = model.config.block_size
    rag_budget = rag_budget or block // 2
    log = History(history) if history is not None else None
    state = {"engine": None}

    @asynccontextmanager
    async def lifespan(app):
        state["engine"] = Engine(model, max_batch=max_batch, max_waiting=max_waiting, cuda_graph=cuda_graph)
        try:
            yield
        finally:
            await asyncio.to_thread(state["engine"].close)

    app = FastAPI(title=f"lm serve: {model_name}", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        message = f"{request.method} {request.url.path}: {err.detail}"
        if err.status_code == 404:
            message += "; the endpoints are POST /chat, /v1/chat/completions, /v1/completions, GET /v1/models, /health"
        return JSONResponse(ApiError(err.status_code, message).body(), status_code=err.status_code)

    def refusal(headers) -> ApiError | None:
        """The API key and the announced body size, checked before anything is read."""
        if api_key is not None:
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return ApiError(401, "this server needs an API key: send 'Authorization: Bearer KEY' (the openai "
                                     "client's api_key).", code="invalid_api_key", kind="authentication_error")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return ApiError(413, f"the request body has {length} bytes; the limit is {max_body_bytes}.")
        return None

    class Guard:
        """`refusal` as a plain ASGI middleware (@app.middleware would wrap `receive`, and then an
        endpoint's `Request.is_disconnected()` never sees a client leave)."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            err = refusal(Headers(scope=scope)) if scope["type"] == "http" else None
            if err is not None:
                return await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
            await self.app(scope, receive, send)

    app.add_middleware(Guard)

    async def read_json(request: Request) -> dict:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_body_bytes:
                raise ApiError(413, f"the request body is over the limit of {max_body_bytes} bytes.")
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON ({err}); send a JSON object.") from None
        except RecursionError:  # arrays or objects nested thousands deep
            raise ApiError(400, "the body is not valid JSON here: it is nested too deeply.") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}.")
        return body

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is not None and name != model_name:
            raise ApiError(404, f"the model {name!r} is not served here; this server serves {model_name!r} "
                                f"(GET /v1/models).", "model", "model_not_found")

    def generation(body: dict, stop=(), max_tokens_name="max_tokens", default_max=None) -> GenerationConfig:
        """The request's sampling settings, checked, over the server's defaults."""
        for name, default in (("n", 1), ("best_of", 1)):
            if body.get(name, default) != default:
                raise ApiError(400, f"'{name}' must be 1: this server returns one choice per request.", name)
        for name in ("logprobs", "echo", "tools", "functions", "suffix"):
            if body.get(name) not in (None, False, [], 0):
                raise ApiError(400, f"'{name}' is not supported by this server.", name)
        for name in ("presence_penalty", "frequency_penalty"):
            if _number(body, name, -2.0, 2.0, default=0) != 0:
                raise ApiError(400, f"'{name}' is not supported (use 'repetition_penalty').", name)
        limit = default_max or settings.max_new_tokens
        for name in (max_tokens_name, "max_completion_tokens", "max_new_tokens"):
            if body.get(name) is not None:
                limit = _number(body, name, 1, 1 << 20, integer=True)
        user_stop = body.get("stop")
        if user_stop is None:
            user_stop = []
        elif isinstance(user_stop, str):
            user_stop = [user_stop]
        if not (isinstance(user_stop, list) and len(user_stop) <= MAX_STOP_STRINGS
                and all(isinstance(s, str) and s for s in user_stop)):
            raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them.",
                           "stop")
        top_p = _number(body, "top_p", 0.0, 1.0, default=settings.top_p)  # 0: only the most likely token, as top_k 1
        try:
            return GenerationConfig(
                max_new_tokens=limit,
                temperature=_number(body, "temperature", 0.0, 2.0, default=settings.temperature),
                top_p=top_p or None,
                top_k=1 if top_p == 0 else _number(body, "top_k", 1, 1 << 20, integer=True, default=settings.top_k),
                repetition_penalty=_number(body, "repetition_penalty", 0.01, 10.0, default=1.0),
                seed=_number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True),
                stop=tuple(dict.fromkeys([*stop, *user_stop])))
        except SamplingError as err:
            raise ApiError(400, str(err)) from None

    def stream_flag(body: dict) -> tuple[bool, bool]:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false.", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object.", "stream_options")
        return stream, bool(options.get("include_usage", False))

    def encode(text_or_messages, chat: bool) -> list[int]:
        try:
            if chat:
                return template.encode_prompt(text_or_messages, tokenizer)
            # a prompt is the user's text: "<EOS>" written in it is five characters, not the special token
            return encode_plain(tokenizer, text_or_messages) or [template_start()]
        except ValueError as err:  # e.g. a character the tokenizer does not know; messages out of order
            raise ApiError(400, f"the prompt cannot be encoded: {err}", "messages" if chat else "prompt") from None

    def template_start() -> int:
        for i in (getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)):
            if i is not None:
                return i
        raise ApiError(400, "the prompt is empty; give some text.", "prompt")

    def with_context(messages: list[dict]) -> list[dict]:
        """RAG-lite: the passages retrieved for the last question in a system message, before any other."""
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        parts = [retriever.context(question, rag_k, tokenizer, rag_budget) if retriever else "", system or ""]
        parts += [m["content"] for m in messages if m["role"] == "system"]
        head = "\n\n".join(p for p in parts if p)
        rest = [m for m in messages if m["role"] != "system"]
        return ([{"role": "system", "content": head}] if head else []) + rest

    def submit(ids: list[int], config: GenerationConfig, notify):
        try:
            return state["engine"].submit(ids, config, notify)
        except EngineBusy as err:
            raise ApiError(503, f"the server is busy: {err}", code="server_busy", kind="server_error") from None
        except ValueError as err:
            raise ApiError(400, str(err), code="context_length_exceeded") from None

    async def run(http: Request, ids, config):
        """Submit and wait for the end: the Result (its text is the whole answer)."""
        mailbox = Mailbox(asyncio.get_running_loop())
        request = submit(ids, config, mailbox.put)
        try:
            while True:
                for kind, value in await mailbox.take(timeout=0.5):
                    if kind != "text":
                        return value
                if await http.is_disconnected():  # checked every half second, tokens coming or not
                    request.cancel()
        finally:
            request.cancel()  # does nothing once it finished; frees the slot if we were interrupted

    def start(ids, config):
        """Submit now (so a busy server or a prompt over the context is still a status code) and
        return the events to stream: ("text", piece) ... ("done", Result). Text that arrived while
        the last piece was being sent goes out as one piece; leaving early cancels the request."""
        mailbox = Mailbox(asyncio.get_running_loop())
        request = submit(ids, config, mailbox.put)

        async def events():
            try:
                while True:
                    arrived = await mailbox.take()
                    text = "".join(value for kind, value in arrived if kind == "text")
                    if text:
                        yield ("text", text)
                    if arrived and arrived[-1][0] != "text":
                        yield arrived[-1]
                        return
            finally:
                request.cancel()

        return events()

    def failure(result) -> ApiError | None:
        """The error answered for a request that did not finish: it failed, or it was cancelled (its
        client went away, so nothing is answered nor kept in the history; or the server is stopping)."""
        if result.finish_reason == "error":
            return ApiError(500, f"generation failed: {result.error}", kind="server_error")
        if result.finish_reason == "cancelled":
            return ApiError(503, "the request was cancelled: the server is stopping.", code="cancelled",
                            kind="server_error")
        return None

    def finished(result) -> str:
        err = failure(result)
        if err is not None:
            raise err
        return "length" if result.finish_reason == "length" else "stop"

    def usage(result) -> dict:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens}

    def remember(messages, answer) -> None:
        if log is not None:
            log.append(history_record(messages, template.cut(answer) if template.stop else answer.strip(), model_name))

    def sse(data) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def chat_messages(body: dict) -> list[dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' is required: a non-empty list of {\"role\", \"content\"} objects.",
                           "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'.", f"messages[{i}]")
            if not isinstance(m["role"], str) or m["role"] not in ROLES:
                raise ApiError(400, f"messages[{i}].role is {m['role']!r}; use one of {sorted(ROLES)}.",
                               f"messages[{i}].role")
            out.append({"role": ROLES[m["role"]], "content": _text(m["content"], f"messages[{i}].content")})
        if out[-1]["role"] != "user":
            raise ApiError(400, "the last message must be the user's: the model answers it.", "messages")
        head = next(i for i, m in enumerate(out) if m["role"] != "system")
        turns = [m["role"] for m in out[head:]]
        if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(turns)):  # as lm.load_examples reads
            raise ApiError(400, f"after the system messages, user and assistant messages must alternate, starting "
                                f"with the user; got {turns}.", "messages")
        if head > 1:  # one system message, as the template lays it out (and the history records it)
            out = [{"role": "system", "content": "\n\n".join(m["content"] for m in out[:head])}, *out[head:]]
        return out

    # ---- endpoints ----
    @app.get("/health")
    async def health():
        engine = state["engine"]
        return {"status": "ok", "model": model_name, "block_size": block, **(engine.stats() if engine else {})}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "lm"}]}

    @app.post("/chat")
    async def chat(http: Request):
        body = await read_json(http)
        message = body.get("message")
        if not isinstance(message, str) or not message.strip():
            raise ApiError(400, "'message' is required: a non-empty string, e.g. {\"message\": \"What is a token?\"}.",
                           "message")
        config = generation(body, template.stop, "max_new_tokens")
        messages = [{"role": "user", "content": message}]
        ids = encode(with_context(messages), chat=True)
        result = await run(http, ids, GenerationConfig.build(config, **_stops(template, tokenizer, config)))
        finished(result)
        answer = template.cut(result.text)
        remember(messages, answer)
        return {"response": answer}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        body = await read_json(http)
        check_model(body)
        messages = chat_messages(body)
        stream, include_usage = stream_flag(body)
        config = generation(body, template.stop)
        config = GenerationConfig.build(config, **_stops(template, tokenizer, config))
        ids = encode(with_context(messages), chat=True)
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": model_name}
        if not stream:
            result = await run(http, ids, config)
            reason = finished(result)
            answer = template.cut(result.text) if reason == "stop" else result.text.lstrip()
            remember(messages, answer)
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": reason, "logprobs": None}],
                    "usage": usage(result)}
        events = start(ids, config)  # headers go out at once; tokens follow as they come

        async def body_stream():
            chunk = {**head, "object": "chat.completion.chunk"}
            yield sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
            held, started = "", False  # whitespace at either end of the answer is not sent (as without streaming)
            async for event in events:
                if event[0] == "text":
                    text = held + event[1] if started else event[1].lstrip()
                    piece = text.rstrip()
                    held = text[len(piece):]
                    if piece:
                        started = True
                        yield sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece},
                                                         "finish_reason": None}]})
            result = event[1]
            if failure(result) is not None:
                yield sse(failure(result).body())
            else:
                remember(messages, result.text)
                yield sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finished(result)}]})
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage(result)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(body_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(http: Request):
        body = await read_json(http)
        check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' is required: a string (one prompt per request).", "prompt")
        stream, include_usage = stream_flag(body)
        config = generation(body, default_max=16)  # OpenAI's default for completions
        ids = encode(prompt, chat=False)
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": model_name}
        if not stream:
            result = await run(http, ids, config)
            return {**head, "choices": [{"index": 0, "text": result.text, "logprobs": None,
                                         "finish_reason": finished(result)}], "usage": usage(result)}
        events = start(ids, config)

        async def body_stream():
            async for event in events:
                if event[0] == "text":
                    yield sse({**head, "choices": [{"index": 0, "text": event[1], "logprobs": None,
                                                    "finish_reason": None}]})
            result = event[1]
            if failure(result) is not None:
                yield sse(failure(result).body())
            else:
                yield sse({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                "finish_reason": finished(result)}]})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(result)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(body_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


class Mailbox:
    """Events from the engine's thread to one request's handler on the event loop. The engine
    wakes the loop only when the mailbox was empty, and the handler takes everything at once, so
    a busy server does not pay one wake-up per token per client."""

    def __init__(self, loop):
        self.loop, self.items, self.lock = loop, [], threading.Lock()
        self.ready = asyncio.Event()
        self.pending = False

    def put(self, event) -> None:  # the engine's thread
        with self.lock:
            self.items.append(event)
            wake, self.pending = not self.pending, True
        if wake:
            self.loop.call_soon_threadsafe(self.ready.set)

    async def take(self, timeout: float | None = None) -> list:
        """Everything that arrived (waiting for something, at most `timeout` seconds)."""
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except asyncio.TimeoutError:
            return []
        with self.lock:
            items, self.items, self.pending = self.items, [], False
            self.ready.clear()
        return items


def _stops(template, tokenizer, config: GenerationConfig) -> dict:
    """The template's end of turn added to the request's own stop strings."""
    options = template.generation_options(tokenizer)
    return {"stop": tuple(dict.fromkeys([*options["stop"], *config.stop])),
            "stop_tokens": tuple(dict.fromkeys([*options["stop_tokens"], *config.stop_tokens]))}


# ---- running it --------------------------------------------------------------------------------
class Server:
    """A uvicorn server on its own thread, for notebooks and tests:

        with lm.server.Server(app) as server:     # port 0: any free port on 127.0.0.1
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.socket = listen(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                       name="lm-server")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}.")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or a ValueError that says why not."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        hint = " (another server is using it: pick another --port)" if err.errno == errno.EADDRINUSE else ""
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}{hint}.") from None
    return sock


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", banner=None) -> None:
    """Run `app` in this thread until Ctrl-C (what `lm serve` does); `banner(url)` is called once
    the port is bound."""
    import uvicorn

    sock = listen(host, port)
    address = f"[{host}]" if ":" in host else host
    if banner is not None:
        banner(f"http://{address}:{sock.getsockname()[1]}")
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])


__all__ = ["ApiError", "History", "Server", "Settings", "create_app", "history_record", "listen", "serve"]
