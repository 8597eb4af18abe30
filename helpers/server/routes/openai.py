"""OpenAI-compatible ``/v1``: chat completions (plain or streamed) and the model list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from helpers.chat.base import validate_messages
from helpers.config import DEFAULT_TEMPERATURE
from helpers.server import protocol as p
from helpers.server.context import Defaults, ServerContext, collect, finish_of, finish_reason
from helpers.server.errors import APIError
from helpers.server.sse import openai_stream_response

router = APIRouter(prefix="/v1", tags=["openai"])

OPENAI_DEFAULTS = Defaults(temperature=DEFAULT_TEMPERATURE)
_ERRORS = {code: {"model": p.ErrorResponse} for code in (400, 401, 413, 422, 503)}


@router.get("/models", response_model=p.ModelList)
async def models(request: Request) -> p.ModelList:
    """The one model this server serves."""
    ctx: ServerContext = request.app.state.ctx
    return p.ModelList(data=[p.ModelCard(id=ctx.model_name)])


@router.post("/chat/completions", response_model=p.ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS})
async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Any:
    """OpenAI-compatible chat completions, plain or streamed (Server-Sent Events)."""
    ctx: ServerContext = request.app.state.ctx
    try:
        messages = validate_messages([m.as_dict() for m in body.messages])
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from exc
    ctx.check_size([m["content"] for m in messages], "messages")
    params = ctx.params(
        OPENAI_DEFAULTS, max_tokens=body.max_completion_tokens or body.max_tokens,
        max_tokens_param="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        repetition_penalty=body.repetition_penalty, seed=body.seed, stop=body.stop,
    )
    stream = ctx.submit(request, messages, params)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return openai_stream_response(stream, request, ctx.model_name, include_usage)
    text = await collect(stream, request)
    finish = finish_of(stream)
    return p.ChatCompletion(
        model=ctx.model_name,
        choices=[p.Choice(message=p.ResponseMessage(content=text),
                          finish_reason=finish_reason(finish))],
        usage=p.Usage.of(finish.prompt_tokens, finish.completion_tokens,
                         finish.cached_tokens),
    )
