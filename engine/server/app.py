"""The HTTP side: OpenAI's routes on FastAPI. Handlers check a request completely (schema, model
name, template, context length) before it reaches the engine thread, so a bad request changes
nothing and gets OpenAI's error JSON; they never block the event loop (template rendering and
tokenizing run in a worker thread, the engine in its own)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from metalforge.engine.server import output
from metalforge.engine.server.chat import ChatTemplateError
from metalforge.engine.server.schemas import ChatRequest, CompletionRequest
from metalforge.engine.server.scheduler import Job, Refused

DEFAULT_MAX_TOKENS = 512   # when a request names no budget (mlx_lm.server's default), within the context

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code=None, param=None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def _error(status: int, message: str, code=None, param=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status)


class ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


class Server:
    """What the routes share: the engine's facts, the chat template, the scheduler, the metrics."""

    def __init__(self, engine, name: str, template, template_error: str | None, scheduler, metrics,
                 api_key: str | None = None):
        self.engine, self.name, self.template, self.template_error = engine, name, template, template_error
        self.scheduler, self.metrics, self.api_key = scheduler, metrics, api_key
        self.stop_ids = set(engine.args.eos_token_id) | (engine.tokenizer.eos_ids if engine.tokenizer else set())
        self.created = int(time.time())

    # ---- checks ---------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided: send 'Authorization: Bearer KEY' with the server's "
                                "--api-key", code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.name}'",
                           code="model_not_found", param="model")

    def job(self, ids: list[int], body) -> Job:
        """A checked job for these prompt ids: not empty, inside the vocabulary and the context."""
        n, context = len(ids), self.scheduler.context
        if n == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        vocab = self.engine.args.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", param="prompt")
        if n >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens, but the prompt is {n} "
                                "tokens", code="context_length_exceeded", param="messages")
        budget = body.token_budget
        if budget is None:
            budget = min(DEFAULT_MAX_TOKENS, context - n)
        elif n + budget > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens, but {n + budget} were "
                                f"requested ({n} in the prompt, {budget} in the completion)",
                           code="context_length_exceeded", param="max_tokens")
        sampling = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                        stop=body.stop or None)
        return Job(ids, budget, sampling, body.alternatives, asyncio.get_running_loop())

    # ---- running a job --------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job)
        except Refused as e:
            raise APIError(e.status, str(e), code="queue_full" if e.status == 429 else "unavailable") from None

    async def events(self, job: Job, gone: asyncio.Future | None = None):
        """The job's events until it ends; ClientGone when `gone` (the client's disconnect) fires
        first. Whatever ends this early cancels the job in the engine."""
        finished = False
        try:
            while not finished:
                get = asyncio.ensure_future(job.events.get())
                if gone is not None:
                    await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()
                        raise ClientGone()
                event = await get
                finished = event[0] != "token"
                if event[0] == "error":
                    raise APIError(event[1], event[2])
                yield event
        finally:
            if not finished:
                self.scheduler.cancel(job)

    async def answer(self, job: Job, body, request: Request, kind: str) -> JSONResponse:
        """The whole answer as one JSON object (a client that disconnects first cancels it)."""
        answer = output.Answer(self.decode, body.stop, self.stop_ids)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            async for event in self.events(job, gone):
                if event[0] == "token":
                    answer.add(event[1])
                else:
                    stats = event[1]
        except ClientGone:
            return JSONResponse({}, status_code=499)   # nobody reads it
        finally:
            gone.cancel()
        _, reason = answer.finish(stats)
        choice = {"index": 0, "finish_reason": reason}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": answer.text}
            choice["logprobs"] = output.chat_logprobs(answer.logprobs) if job.logprobs is not None else None
        else:
            choice["text"] = answer.text
            choice["logprobs"] = output.completion_logprobs(answer.logprobs, 0) if job.logprobs is not None else None
        return JSONResponse({**self._head(kind), "choices": [choice], "usage": output.usage(stats)})

    def stream(self, job: Job, body, kind: str) -> StreamingResponse:
        """Server-sent events, one chunk per token that releases text, as OpenAI streams them. A
        client that disconnects cancels the job (Starlette cancels this generator)."""
        head = self._head(kind, chunk=True)
        include_usage = body.include_usage
        answer = output.Answer(self.decode, body.stop, self.stop_ids)

        def chunk(text: str, entries: list, reason: str | None, first: bool = False) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                logprobs = output.chat_logprobs(entries) if job.logprobs is not None and not first else None
                choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            else:
                logprobs = (output.completion_logprobs(entries, len(answer.text) - len(text))
                            if job.logprobs is not None else None)
                choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}
            event = {**head, "choices": [choice]}
            if include_usage:
                event["usage"] = None
            return _sse(event)

        async def sse():
            if kind == "chat":
                yield chunk("", [], None, first=True)
            try:
                async for event in self.events(job):
                    if event[0] == "token":
                        text, entries = answer.add(event[1])
                        if text or entries:
                            yield chunk(text, entries, None)
                    else:
                        stats = event[1]
                        text, reason = answer.finish(stats)
                        yield chunk(text, [], reason)
                        if include_usage:
                            yield _sse({**head, "choices": [], "usage": output.usage(stats)})
            except APIError as e:      # after the headers went out: the error is the stream's last event
                yield _sse(error_body(e.status, e.message, e.code))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _head(self, kind: str, chunk: bool = False) -> dict:
        """The fields every object of one answer shares (a new id per answer)."""
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if kind == "chat" else "text_completion"
        return {"id": prefix + uuid.uuid4().hex[:24], "object": obj, "created": int(time.time()), "model": self.name}

    def decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids) if self.engine.tokenizer else " ".join(map(str, ids))


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # a field that may take several types reports one error per type: name the field once
    field = ".".join(p for p in loc if not p.startswith(("list[", "str", "int", "function-")))
    if not loc:
        return f"the request body must be a JSON object ({first.get('msg', 'invalid')})", None
    return f"{field or '.'.join(loc)}: {first.get('msg', 'invalid')}", field.split(".")[0] if field else None


def create_app(server: Server, allow_origins=()) -> FastAPI:
    """The routes over `server`; `allow_origins`: web page origins that may call it (CORS)."""
    @contextlib.asynccontextmanager
    async def lifespan(_):
        try:
            yield
        finally:
            server.scheduler.stop()

    app = FastAPI(title="metalforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error(e.status, e.message, e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        message, param = _validation_message(e)
        return _error(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return _error(e.status_code, str(e.detail))

    app.add_middleware(CountRequests, metrics=server.metrics)
    if allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    auth = [Depends(server.authorize)]

    @app.get("/health")
    async def health():
        failure = server.scheduler.failure
        return _error(503, failure) if failure else {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [_model(server)]}

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def model(model: str):
        server.check_model(model)
        return _model(server)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatRequest, request: Request):
        server.check_model(body.model)
        if server.template is None or server.engine.tokenizer is None:
            raise APIError(400, server.template_error or "this model folder has no tokenizer.json: chat needs one")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = await asyncio.to_thread(lambda: server.engine.tokenizer.encode(server.template.render(messages)))
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        return await _run(server, ids, body, request, "chat")

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        if isinstance(prompt, str):
            if server.engine.tokenizer is None:
                raise APIError(400, "this model folder has no tokenizer.json: send the prompt as a list of token ids",
                               param="prompt")
            prompt = await asyncio.to_thread(server.engine.tokenizer.encode, prompt)
        return await _run(server, prompt, body, request, "completion")

    return app


class CountRequests:
    """Counts responses by route and status (a plain ASGI middleware: Starlette's BaseHTTPMiddleware
    wraps `receive`, which would hide a client's disconnect from the handlers)."""
    PATHS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.PATHS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count("http_requests_total", path=path, status=message["status"])
            await send(message)
        await self.app(scope, receive, counting_send)


def _model(server: Server) -> dict:
    return {"id": server.name, "object": "model", "created": server.created, "owned_by": "metalforge"}


async def _run(server: Server, ids: list[int], body, request: Request, kind: str):
    job = server.job(ids, body)
    server.submit(job)
    if body.stream:
        return server.stream(job, body, kind)
    return await server.answer(job, body, request, kind)
