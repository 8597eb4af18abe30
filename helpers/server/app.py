"""``create_app(chat_model, settings) -> FastAPI``: the chapter's ``POST /`` and OpenAI's ``/v1``.

No module globals: each app owns its engine, settings and model, so two apps in one process
share nothing. Generation runs in the engine's worker thread; handlers only await results, so
``/health`` answers in milliseconds while the model is busy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from helpers.chat import (
    ChatModel,
    GenerationParams,
    TransformersChat,
    history_to_messages,
    is_linly_prompt,
    messages_to_pairs,
    parse_linly_prompt,
    validate_messages,
)
from helpers.config import Settings, get_settings
from helpers.server import protocol as p
from helpers.server.engine import Stream, create_engine

logger = logging.getLogger("dhllm.server")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]

MAX_BODY_BYTES = 16 * 2**20  # far above any sane prompt; stops a client from filling memory


class APIError(Exception):
    """An error with an HTTP status, rendered in OpenAI's shape on /v1 and as ``detail`` on /."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or _error_type(status)
        self.retry_after = retry_after


def _error_type(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error", 503: "overloaded_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")


def _error_response(path: str, err: APIError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(err.retry_after)))} if err.retry_after else None
    if path.startswith("/v1"):
        body: dict[str, Any] = p.ErrorResponse(error=p.ErrorDetail(
            message=err.message, type=err.type, param=err.param, code=err.status)).model_dump()
    else:
        body = {"detail": err.message, "param": err.param, "status": err.status}
    return JSONResponse(body, status_code=err.status, headers=headers)


def map_exception(exc: BaseException) -> APIError:
    """ChatModel errors keep their status; ValueError is the client's fault (400)."""
    if isinstance(exc, APIError):
        return exc
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status < 600:
        message = str(exc)
        provider = getattr(exc, "provider_message", None)
        if provider:
            message = f"{message} (provider said: {provider})"
        return APIError(status, message, retry_after=getattr(exc, "retry_after", None))
    if isinstance(exc, ValueError):
        text = str(exc)
        param = text.split()[0].rstrip(":") if text else None
        return APIError(400, text, param=param)
    logger.exception("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # The whole body is unusable (not JSON, not an object, empty): 400 as for any bad request.
    whole_body = any(e.get("type") == "json_invalid" or tuple(e.get("loc", ())) == ("body",)
                     for e in errors)
    if whole_body:
        return APIError(400, "the request body must be a JSON object (Content-Type: "
                             "application/json)", param="body")
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}")
    return APIError(422, "; ".join(parts), param=".".join(loc) or None)


# ---------------------------------------------------------------------------------------------
# Auth, request ids and the one log line per request: a plain ASGI middleware, so streaming and
# disconnect detection pass through untouched (BaseHTTPMiddleware would wrap them).


class _RequestMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self._expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:12]
        state: dict[str, Any] = dict(scope.get("state") or {})
        state["request_id"] = request_id
        scope["state"] = state
        path = scope["path"]
        started = time.perf_counter()
        status = [0]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        headers = dict(scope.get("headers") or [])
        try:
            if self._expected and path != "/health" and not secrets.compare_digest(
                headers.get(b"authorization", b""), self._expected
            ):
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               type_="authentication_error")
                response = _error_response("/v1" if path.startswith("/v1") else path, err)
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send_wrapper)
                return
            length = headers.get(b"content-length", b"0")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                err = APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", "body")
                await _error_response(path, err)(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            if path != "/health" or status[0] >= 400:  # health probes would drown the log
                extra = ""
                if self.settings.log_prompts and "prompt" in state:
                    extra = f" prompt={state['prompt']!r}"
                logger.info(
                    "id=%s route=%s %s status=%s tokens=%s latency=%.3fs%s",
                    request_id, scope.get("method"), path, status[0] or 499,
                    state.get("tokens", 0), time.perf_counter() - started, extra,
                )


# ---------------------------------------------------------------------------------------------
# The app.


def create_app(chat_model: ChatModel, settings: Settings | None = None) -> FastAPI:
    """A FastAPI app serving ``chat_model``; nothing is shared with other apps."""
    settings = settings or get_settings()
    engine = create_engine(chat_model, max_batch_size=settings.max_batch_size,
                           max_queue=settings.max_queue)
    model_name = getattr(chat_model, "name", "model")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="dhllm",
        description=(
            "The chapter's `POST /` (prompt, history) and an OpenAI-compatible `/v1` API for "
            f"the model `{model_name}`. Concurrent requests are batched together."
        ),
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.chat_model = chat_model
    app.add_middleware(_RequestMiddleware, settings=settings)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(request.url.path, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(request.url.path, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(request.url.path, map_exception(exc))

    def check_size(messages: list[dict[str, str]], param: str) -> None:
        size = sum(len(m["content"]) for m in messages)
        if size > settings.max_prompt_chars:
            raise APIError(413, f"{param} is too long: {size} characters, the limit is "
                                f"{settings.max_prompt_chars} (DHLLM_MAX_PROMPT_CHARS)", param)

    def check_tokens(value: int | None, param: str) -> int:
        if value is None:
            return settings.default_max_new_tokens
        if value > settings.max_new_tokens_cap:
            raise APIError(422, f"{param} must be at most {settings.max_new_tokens_cap} "
                                f"(DHLLM_MAX_NEW_TOKENS_CAP); got {value}", param)
        return value

    def submit(request: Request, messages: list[dict[str, str]], params: GenerationParams,
               prompt_text: str | None = None) -> Stream:
        if settings.log_prompts:
            request.state.prompt = prompt_text or messages[-1]["content"]
        try:
            return engine.submit(messages, params, prompt_text=prompt_text)
        except Exception as exc:
            raise map_exception(exc) from exc

    @app.get("/health", response_model=p.Health, tags=["meta"])
    async def health() -> p.Health:
        """Always open (no API key), cheap: for load balancers and notebooks."""
        return p.Health(model=model_name, engine=engine.kind, stats=engine.stats.as_dict())

    @app.post("/", response_model=p.ChapterResponse, tags=["chapter"],
              responses={400: {}, 413: {}, 422: {}, 503: {}})
    async def chapter(body: p.ChapterRequest, request: Request) -> p.ChapterResponse:
        """The chapter's contract: prompt + history in, response + history out."""
        messages, prompt_text, question = _chapter_messages(body, chat_model)
        check_size(messages if prompt_text is None else [{"content": prompt_text}], "prompt")
        params = _params(
            max_new_tokens=check_tokens(body.max_length, "max_length"),
            temperature=_default(body.temperature, p.CHAPTER_TEMPERATURE),
            top_p=_default(body.top_p, p.CHAPTER_TOP_P),
            top_k=_default(body.top_k, p.CHAPTER_TOP_K),
            repetition_penalty=_default(body.repetition_penalty, p.CHAPTER_REPETITION_PENALTY),
        )
        stream = submit(request, messages, params, prompt_text)
        text = await _collect(stream, request)
        request.state.tokens = stream.finish.completion_tokens if stream.finish else 0
        history = messages_to_pairs(messages[:-1]) + [[question, text]]
        return p.ChapterResponse(response=text, history=history,
                                 time=datetime.now().strftime("%Y-%m-%d %H:%M:%S"))

    @app.get("/v1/models", response_model=p.ModelList, tags=["openai"])
    async def models() -> p.ModelList:
        """The one model this server serves."""
        return p.ModelList(data=[p.ModelCard(id=model_name)])

    @app.post("/v1/chat/completions", response_model=p.ChatCompletion, tags=["openai"],
              responses={200: {"content": {"text/event-stream": {}}}, 400: {"model": p.ErrorResponse},
                         401: {"model": p.ErrorResponse}, 413: {"model": p.ErrorResponse},
                         422: {"model": p.ErrorResponse}, 503: {"model": p.ErrorResponse}})
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Any:
        """OpenAI-compatible chat completions, plain or streamed (Server-Sent Events)."""
        try:
            messages = validate_messages([m.as_dict() for m in body.messages])
        except ValueError as exc:
            raise APIError(400, str(exc), "messages") from exc
        check_size(messages, "messages")
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        params = _params(
            max_new_tokens=check_tokens(body.max_completion_tokens or body.max_tokens, param),
            temperature=_default(body.temperature, p.OPENAI_TEMPERATURE),
            top_p=_default(body.top_p, 1.0),
            top_k=_default(body.top_k, 0),
            repetition_penalty=_default(body.repetition_penalty, 1.0),
            seed=body.seed,
            stop=body.stop or (),
        )
        stream = submit(request, messages, params)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse(stream, request, model_name, include_usage)
            return _CancellingStreamingResponse(events, stream.cancel,
                                                media_type="text/event-stream",
                                                headers={"Cache-Control": "no-cache"})
        text = await _collect(stream, request)
        finish = stream.finish
        assert finish is not None
        request.state.tokens = finish.completion_tokens
        return p.ChatCompletion(
            model=model_name,
            choices=[p.Choice(message=p.ResponseMessage(content=text),
                              finish_reason=_finish_reason(finish.reason))],
            usage=_usage(finish.prompt_tokens, finish.completion_tokens),
        )

    return app


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _params(**kwargs: Any) -> GenerationParams:
    try:
        return GenerationParams(**kwargs)
    except ValueError as exc:
        raise map_exception(exc) from exc


def _chapter_messages(
    body: p.ChapterRequest, chat_model: ChatModel
) -> tuple[list[dict[str, str]], str | None, str]:
    """Messages for the engine, a raw prompt to use as is (or None), and the clean question.

    A prompt that already carries the Linly template (Linly-Talker's api client folds system,
    history and question into it) is never wrapped again: a Linly model gets it verbatim; any
    other model gets it parsed back into messages and rendered with its own template.
    """
    try:
        history = history_to_messages(
            [h.model_dump() if isinstance(h, p.Message) else h for h in body.history or []]
        )
        if is_linly_prompt(body.prompt):
            parsed = parse_linly_prompt(body.prompt)
            system = [m for m in parsed if m["role"] == "system"]
            turns = [m for m in parsed if m["role"] != "system"]
            messages = validate_messages(system + history + turns)
            verbatim = (
                not history
                and isinstance(chat_model, TransformersChat)
                and chat_model.prompt_format == "linly"
            )
            return messages, (body.prompt if verbatim else None), turns[-1]["content"]
        messages = validate_messages([*history, {"role": "user", "content": body.prompt}])
    except ValueError as exc:
        text = str(exc)
        raise APIError(422, text, "history" if "history" in text else "prompt") from exc
    return messages, None, body.prompt


async def _collect(stream: Stream, request: Request) -> str:
    """The whole reply; a client that hangs up cancels its generation."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                stream.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await stream.text()
    except Exception as exc:
        raise map_exception(exc) from exc
    finally:
        watcher.cancel()


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> p.Usage:
    return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


async def _sse(stream: Stream, request: Request, model: str,
               include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk, content chunks as generated, a finish chunk, [DONE]."""
    chunk_id, created = p.completion_id(), int(time.time())

    def event(choices: list[p.ChunkChoice], usage: p.Usage | None = None) -> str:
        chunk = p.ChatCompletionChunk(id=chunk_id, created=created, model=model,
                                      choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json(exclude_none=usage is None)}\n\n"

    yield event([p.ChunkChoice(delta=p.Delta(role="assistant", content=""))])
    try:
        async for piece in stream:
            yield event([p.ChunkChoice(delta=p.Delta(content=piece))])
        finish = stream.finish
        assert finish is not None
        request.state.tokens = finish.completion_tokens
        yield event([p.ChunkChoice(delta=p.Delta(), finish_reason=_finish_reason(finish.reason))])
        if include_usage:
            yield event([], _usage(finish.prompt_tokens, finish.completion_tokens))
    except Exception as exc:  # headers are gone: report the error in the stream, as OpenAI does
        err = map_exception(exc)
        detail = p.ErrorDetail(message=err.message, type=err.type, param=err.param,
                               code=err.status)
        yield f"data: {json.dumps({'error': detail.model_dump()})}\n\n"
    yield "data: [DONE]\n\n"


class _CancellingStreamingResponse(StreamingResponse):
    """A StreamingResponse that cancels its generation however the response ends."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()  # a no-op when the stream has finished
