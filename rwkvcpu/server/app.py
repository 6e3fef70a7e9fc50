"""The HTTP layer: OpenAI's routes over a Scheduler, errors mapped once to OpenAI's error JSON.

Routes translate a request body (schemas.py) into scheduler Requests and the
scheduler's events into OpenAI's response or server-sent-event chunks; nothing
else lives here. `create_app` builds the ASGI app (FastAPI) for uvicorn, an
in-process server (rwkvcpu.server.start) or another host such as Ray Serve.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ..errors import InvalidArgumentError, RwkvCpuError
from ..generate import TURN_END, chat_turn, clean_message, model_tokenizer
from ..sampling import SamplingParams, make_params
from ..scheduler import Failed, Finished, QueueFullError, Request, Scheduler, SchedulerStoppedError, Token
from .metrics import Metrics
from .schemas import ChatRequest, CompletionRequest
from .tools import ToolPlan, call_text, plan_tools, response_format_constraint

log = logging.getLogger("rwkvcpu.server")

# Sampling when a request leaves a field out: OpenAI's defaults (temperature 1, top_p 1, no
# penalties), with rwkvcpu's penalty decay for when penalties are given.
OPENAI_DEFAULTS = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, presence_penalty=0.0,
                                 frequency_penalty=0.0, max_tokens=None)
# /v1/completions' default max_tokens, as OpenAI's.
COMPLETION_MAX_TOKENS = 16


@dataclasses.dataclass
class Settings:
    """What an rwkvcpu server allows; `rwkvcpu serve --help` describes each.

    Attributes:
        model_name: the id clients pass as `model` (default: the model file's name without extension).
        api_key: when set, every route but /health and the chat page needs `Authorization: Bearer KEY`.
        cors_origins: origins allowed to call from a browser (CORS is off when empty).
        max_body_bytes: larger request bodies get 413.
        max_prompt_tokens: longer prompts get 413.
        max_tokens: the most tokens one choice may generate; a chat request without
            max_tokens generates up to this.
    """

    model_name: str = "rwkv"
    api_key: Optional[str] = None
    cors_origins: tuple = ()
    max_body_bytes: int = 4 << 20
    max_prompt_tokens: int = 32768
    max_tokens: int = 2048


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded"}

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _as_api_error(exc: Exception) -> APIError:
    """Every error a route can meet, as the one OpenAI-shaped answer."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), code="server_overloaded", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, SchedulerStoppedError):
        return APIError(503, str(exc), code="server_shutting_down", headers={"Retry-After": "5"})
    if isinstance(exc, RwkvCpuError):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return APIError(404, "no such route; the routes are /v1/models, /v1/completions, "
                                 "/v1/chat/completions, /health, /metrics", code="unknown_route")
        return APIError(exc.status_code, str(exc.detail))
    if isinstance(exc, RequestValidationError):
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON", code="invalid_json")
        where = ".".join(loc)
        return APIError(400, f"{where}: {err.get('msg', 'invalid value')}" if where else
                        f"the request body is invalid: {err.get('msg', '')}", param=where or None,
                        code="invalid_value")
    log.exception("unexpected error")
    return APIError(500, "internal error (see the server's log)", code="internal_error")


# ------------------------------------------------------------------- middleware (pure ASGI)


class Guard:
    """Body size limit, API key and request counting, before any route runs.

    Pure ASGI (not BaseHTTPMiddleware) so that streamed responses and client
    disconnects pass through untouched.
    """

    OPEN = ("/health", "/")      # no key needed: the liveness probe, and the chat page (static, no data)

    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        if self.key is not None and scope["method"] != "OPTIONS" and scope["path"] not in self.OPEN:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                what = "no API key given" if not given else "wrong API key"
                err = APIError(401, f"{what}: send the header 'Authorization: Bearer KEY' with the server's "
                                    f"--api-key", code="invalid_api_key")
                return await err.response()(scope, receive, counted_send)
        limit = self.settings.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        too_big = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            return await too_big.response()(scope, receive, counted_send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            # Read the body here (routes read it whole anyway), counting, then hand it on.
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > limit:
                    return await too_big.response()(scope, receive, counted_send)
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()
            return await self.app(scope, replay, counted_send)
        return await self.app(scope, receive, counted_send)


ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


# ------------------------------------------------------------------------- the app


class Service:
    """What the routes share: the model, its scheduler and tokenizer, the settings."""

    def __init__(self, model, scheduler: Scheduler, settings: Settings, metrics: Metrics):
        self.model, self.scheduler, self.settings, self.metrics = model, scheduler, settings, metrics
        self.tokenizer = model_tokenizer(model)
        self.created = int(time.time())
        self.fingerprint = "rwkvcpu-" + model.fingerprint[:12]
        self.assistant = self.tokenizer.encode("Assistant:")

    # ------------------------------------------------------------ request -> scheduler

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.settings.model_name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    def params(self, body, max_tokens: Optional[int], extra_stop: tuple = ()) -> SamplingParams:
        """The body's sampling fields as SamplingParams (bad values: 400 naming the field)."""
        limit = self.settings.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens must be at most {limit} on this server, got {max_tokens}",
                           param="max_tokens", code="invalid_value")
        fields = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                                "frequency_penalty", "repetition_penalty", "penalty_decay", "seed")
                  if getattr(body, k) is not None}
        bias = {}
        for k, v in (body.logit_bias or {}).items():
            try:
                bias[int(k)] = max(-100.0, min(100.0, float(v)))
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids, got {k!r}", param="logit_bias",
                               code="invalid_value") from None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop", code="invalid_value")
        params = make_params(OPENAI_DEFAULTS, max_tokens=limit if max_tokens is None else max_tokens,
                             logit_bias=bias, stop=tuple(extra_stop) + tuple(s for s in stop if s not in extra_stop),
                             **fields)
        params.check_vocab(self.model.config.vocab_size)
        return params

    def check_prompt(self, tokens: list) -> None:
        limit = self.settings.max_prompt_tokens
        if len(tokens) > limit:
            raise APIError(413, f"the prompt has {len(tokens)} tokens, more than this server's limit of {limit}",
                           param="prompt", code="context_length_exceeded")
        if not tokens:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")

    def submit(self, request: Request) -> "object":
        return self.scheduler.submit(request, loop=asyncio.get_running_loop())

    def chat_prompt(self, body: ChatRequest, tools: str = "") -> tuple:
        """The messages in the World chat format, as tokens, with the boundaries after each message.

        `tools` (a system turn describing the functions the reply may call) comes first;
        an assistant's tool calls are its reply, a tool's result a "Tool" turn."""
        encode = self.tokenizer.encode
        tokens, boundaries = [], []
        if tools:
            tokens += encode(chat_turn("System", tools))
            boundaries.append(len(tokens))
        for m in body.messages:
            if m.role in ("system", "developer"):
                tokens += encode(chat_turn("System", m.text()))
            elif m.role == "user":
                tokens += encode(chat_turn("User", m.text()))
            elif m.role == "tool":
                tokens += encode(chat_turn("Tool", m.text()))
            else:
                tokens += self.assistant + self.reply_tokens(m.text() or call_text(m.tool_calls))
            boundaries.append(len(tokens))
        tokens += self.assistant
        boundaries.append(len(tokens))
        return tokens, boundaries

    def reply_tokens(self, text: str) -> list:
        """An assistant's reply as a later prompt holds it, after "Assistant:"."""
        return self.tokenizer.encode(f" {clean_message(text)}{TURN_END}")

    # ------------------------------------------------------------ events -> responses

    def token_text(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def usage(self, handles) -> dict:
        prompt = sum(h.prompt_tokens for h in handles)
        completion = sum(h.completion_tokens for h in handles)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(h.cached_tokens for h in handles)}}


async def _cancel_on_disconnect(http: HTTPRequest, handles) -> None:
    """Cancel the requests when the client goes away before the answer is complete."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            for h in handles:
                h.cancel()
            return


async def _events(handles):
    """(request number, event) from several handles as they come."""
    if len(handles) == 1:
        async for event in handles[0]:
            yield 0, event
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i, h):
        try:
            async for event in h:
                await merged.put((i, event))
        finally:
            await merged.put((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, event = await merged.get()
            if event is None:
                left -= 1
            else:
                yield i, event
    finally:
        for t in tasks:
            t.cancel()


def create_app(model, *, settings: Optional[Settings] = None, scheduler: Optional[Scheduler] = None,
               metrics: Optional[Metrics] = None) -> FastAPI:
    """The ASGI app serving `model` through `scheduler` (which the caller starts and stops).

    Args:
        model: a loaded Model.
        settings: Settings (defaults if None).
        scheduler: a Scheduler of the model (a default one if None; start it before serving).
        metrics: Metrics that the scheduler reports to (made if None).

    Returns:
        a FastAPI app; `app.state.service` holds the model, scheduler and settings.
    """
    settings = settings or Settings()
    if scheduler is None:
        metrics = metrics or Metrics()
        scheduler = Scheduler(model, observer=metrics)
    if metrics is None:
        metrics = Metrics()
    metrics.watch(scheduler, scheduler.cache)
    service = Service(model, scheduler, settings, metrics)
    app = FastAPI(title="rwkvcpu", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    # The last added runs first: CORS answers preflights and marks every answer, errors included.
    app.add_middleware(Guard, settings=settings, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(Exception)
    async def any_error(request, exc):
        return _as_api_error(exc).response()

    for kind in (APIError, RwkvCpuError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(kind, any_error)

    page = resources.files(__package__).joinpath("chat.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_card():
        return {"id": settings.model_name, "object": "model", "created": service.created, "owned_by": "rwkvcpu"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        service.check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        service.check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported by rwkvcpu", param="suffix", code="unsupported")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported by rwkvcpu", param="best_of",
                           code="unsupported")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (the prompt's logprobs) is not supported by rwkvcpu",
                           param="echo", code="unsupported")
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        token_lists = []
        for p in prompts:
            try:
                tokens = service.tokenizer.encode(p) if isinstance(p, str) else service.tokenizer.check_ids(
                    p, "prompt token id")
            except InvalidArgumentError as e:
                raise APIError(400, str(e), param="prompt", code="invalid_value") from None
            service.check_prompt(tokens)
            token_lists.append(tokens)
        params = service.params(body, COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens)
        handles = _submit_all(service, [Request(t, params, n=body.n, logprobs=body.logprobs,
                                                boundaries=[len(t)]) for t in token_lists])
        echo = [(service.tokenizer.decode(t) if body.echo else "") for t in token_lists]
        answer = CompletionAnswer(service, body, handles, echo)
        if body.stream:
            return EventSourceResponse(answer.stream(), ping=15, sep="\n")
        return await answer.whole(http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        service.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        try:
            constraint = response_format_constraint(body.response_format)
        except InvalidArgumentError as e:
            raise APIError(400, f"response_format: {e}", param="response_format", code="invalid_value") from None
        try:
            plan = plan_tools(body.tools, body.tool_choice)
        except InvalidArgumentError as e:
            raise APIError(400, str(e), param="tools", code="invalid_value") from None
        if constraint is not None and plan.constraint is not None:
            raise APIError(400, "response_format json and tools at once are not supported: give tool_choice "
                                "\"none\" or a text response_format", param="response_format", code="unsupported")
        tokens, boundaries = service.chat_prompt(body, plan.system)
        service.check_prompt(tokens)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = service.params(body, limit, extra_stop=(TURN_END,))
        request = Request(tokens, params, n=body.n, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                          boundaries=boundaries, close_turn=service.reply_tokens, strip_leading_space=True,
                          constraint=constraint or plan.constraint)
        handles = _submit_all(service, [request])
        answer = ChatAnswer(service, body, handles, plan)
        if body.stream:
            return EventSourceResponse(answer.stream(), ping=15, sep="\n")
        return await answer.whole(http)

    return app


def _submit_all(service: Service, requests) -> list:
    """Submit every request or none (a refusal cancels the ones already queued)."""
    handles = []
    try:
        for r in requests:
            handles.append(service.submit(r))
    except Exception:
        for h in handles:
            h.cancel()
        raise
    return handles


class _Answer:
    """Turns a request's events into OpenAI's response: whole, or as server-sent events."""

    object_name = ""

    def __init__(self, service: Service, body, handles):
        self.service, self.body, self.handles = service, body, handles
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.n = body.n

    def choice_index(self, request_no: int, index: int) -> int:
        return request_no * self.n + index

    async def whole(self, http: HTTPRequest) -> dict:
        watcher = asyncio.create_task(_cancel_on_disconnect(http, self.handles))
        try:
            choices = {}
            async for no, event in _events(self.handles):
                if isinstance(event, Failed):
                    raise _failure(event)
                i = self.choice_index(no, event.index)
                c = choices.setdefault(i, self.new_choice(no))
                if isinstance(event, Token):
                    self.add_token(c, event)
                elif isinstance(event, Finished):
                    c["finish_reason"] = event.finish_reason
        finally:
            watcher.cancel()
            for h in self.handles:
                if not h.done:
                    h.cancel()
        return {"id": self.id, "object": self.object_name, "created": self.created,
                "model": self.service.settings.model_name, "system_fingerprint": self.service.fingerprint,
                "choices": [self.final_choice(i, choices[i]) for i in sorted(choices)],
                "usage": self.service.usage(self.handles)}

    async def stream(self):
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        usage_field = {"usage": None} if include_usage else {}
        try:
            for i in range(len(self.handles) * self.n):
                first = self.first_chunk(i)
                if first is not None:
                    yield self.chunk([first], usage_field)
            async for no, event in _events(self.handles):
                if isinstance(event, Failed):
                    yield json.dumps(_failure(event).body())
                    break
                i = self.choice_index(no, event.index)
                if isinstance(event, Token):
                    piece = self.token_chunk(i, event) if event.text or event.logprob is not None else None
                    if piece is not None:
                        yield self.chunk([piece], usage_field)
                elif isinstance(event, Finished):
                    yield self.chunk([self.finish_chunk(i, event)], usage_field)
            else:
                if include_usage:
                    yield self.chunk([], {"usage": self.service.usage(self.handles)})
            yield "[DONE]"
        finally:
            for h in self.handles:
                if not h.done:
                    h.cancel()

    def chunk(self, choices, extra) -> str:
        return json.dumps({"id": self.id, "object": self.chunk_name, "created": self.created,
                           "model": self.service.settings.model_name,
                           "system_fingerprint": self.service.fingerprint, "choices": choices, **extra},
                          ensure_ascii=False)


def _failure(event: Failed) -> APIError:
    if event.message == "the server is shutting down":
        return APIError(503, event.message, code="server_shutting_down")
    return APIError(500, event.message, code="internal_error")


class ChatAnswer(_Answer):
    """A chat completion; with tools, a complete reply that is a call becomes OpenAI's tool_calls
    (finish_reason "tool_calls"), and a streamed reply that may be a call is held back and sent
    whole with its finish (as one delta of content or of tool_calls)."""

    id_prefix, object_name, chunk_name = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, service, body, handles, plan: ToolPlan = ToolPlan("none")):
        super().__init__(service, body, handles)
        self.plan = plan
        self.held = {}              # choice -> text held back while it may be a call (streaming)

    def message(self, text: str, finish_reason):
        """(message fields, finish_reason) of a reply: a tool call when it is one."""
        calls = self.plan.tool_calls(text) if finish_reason == "stop" else None
        if calls:
            return {"content": None, "tool_calls": calls}, "tool_calls"
        return {"content": text}, finish_reason

    def new_choice(self, no):
        return {"text": [], "logprobs": [], "finish_reason": None}

    def logprob_entry(self, event: Token) -> dict:
        def one(token, lp):
            text = self.service.token_text(token)
            return {"token": text, "logprob": lp, "bytes": list(self.service.tokenizer.token_bytes(token))}
        entry = one(event.token, event.logprob)
        entry["top_logprobs"] = [one(t, lp) for t, lp in (event.top_logprobs or [])]
        return entry

    def add_token(self, c, event: Token):
        c["text"].append(event.text)
        if event.logprob is not None and event.token is not None:
            c["logprobs"].append(self.logprob_entry(event))

    def final_choice(self, i, c):
        message, finish_reason = self.message("".join(c["text"]), c["finish_reason"])
        return {"index": i, "message": {"role": "assistant", **message},
                "logprobs": {"content": c["logprobs"]} if self.body.logprobs else None,
                "finish_reason": finish_reason}

    def first_chunk(self, i):
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def token_chunk(self, i, event: Token):
        if self.plan.mode != "none" and self.held.get(i, "") is not None:
            held = self.held.get(i, "") + event.text
            if self.plan.mode != "auto" or not held or held.startswith("{"):
                self.held[i] = held
                return None
            # "auto" and words, not a call: from here on streamed as they come
            self.held[i], event = None, dataclasses.replace(event, text=held)
        logprobs = None
        if self.body.logprobs and event.token is not None and event.logprob is not None:
            logprobs = {"content": [self.logprob_entry(event)]}
        return {"index": i, "delta": {"content": event.text}, "logprobs": logprobs, "finish_reason": None}

    def finish_chunk(self, i, event: Finished):
        delta, finish_reason = {}, event.finish_reason
        if self.held.get(i) is not None and self.plan.mode != "none":
            delta, finish_reason = self.message(self.held.pop(i, ""), event.finish_reason)
            if "tool_calls" in delta:
                delta = {"tool_calls": [dict(call, index=k) for k, call in enumerate(delta["tool_calls"])]}
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


class CompletionAnswer(_Answer):
    id_prefix, object_name, chunk_name = "cmpl", "text_completion", "text_completion"

    def __init__(self, service, body, handles, echo):
        super().__init__(service, body, handles)
        self.echo = echo
        self.offsets = {}

    def new_choice(self, no):
        return {"text": [self.echo[no]], "tokens": [], "token_logprobs": [], "top_logprobs": [],
                "text_offset": [], "offset": len(self.echo[no]), "finish_reason": None}

    def logprobs_of(self, c, event: Token):
        token = self.service.token_text(event.token)
        c["tokens"].append(token)
        c["token_logprobs"].append(event.logprob)
        c["top_logprobs"].append({self.service.token_text(t): lp for t, lp in (event.top_logprobs or [])})
        c["text_offset"].append(c["offset"])
        c["offset"] += len(token)

    def add_token(self, c, event: Token):
        c["text"].append(event.text)
        if event.logprob is not None and event.token is not None:
            self.logprobs_of(c, event)

    def final_choice(self, i, c):
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = {k: c[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        return {"index": i, "text": "".join(c["text"]), "logprobs": logprobs, "finish_reason": c["finish_reason"]}

    def first_chunk(self, i):
        no = i // self.n
        if not self.echo[no]:
            return None
        return {"index": i, "text": self.echo[no], "logprobs": None, "finish_reason": None}

    def token_chunk(self, i, event: Token):
        logprobs = None
        if self.body.logprobs is not None and event.token is not None and event.logprob is not None:
            # a chunk's logprobs hold its one token; text_offset runs on over the whole choice
            c = self.new_choice(i // self.n)
            c["offset"] = self.offsets.get(i, c["offset"])
            self.logprobs_of(c, event)
            self.offsets[i] = c["offset"]
            logprobs = {k: c[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        return {"index": i, "text": event.text, "logprobs": logprobs, "finish_reason": None}

    def finish_chunk(self, i, event: Finished):
        return {"index": i, "text": "", "logprobs": None, "finish_reason": event.finish_reason}
