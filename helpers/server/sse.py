"""OpenAI's streaming format over Server-Sent Events, with sse-starlette doing the wire work.

sse-starlette frames events, sends keep-alive pings and notices a client that hangs up; we
only decide what each event says, and cancel the generation however the stream ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from sse_starlette import EventSourceResponse

from helpers.server import protocol as p
from helpers.server.context import finish_of, finish_reason
from helpers.server.engine import Stream
from helpers.server.errors import map_exception

SHUTDOWN_GRACE_S = 2.0  # below uvicorn's graceful shutdown timeout in serve_in_background (3 s)


def openai_stream_response(stream: Stream, request: Request, model: str,
                           include_usage: bool) -> EventSourceResponse:
    """A streaming ``/v1/chat/completions`` reply for ``stream``."""
    # On SIGTERM sse-starlette cancels every stream at once, cut off mid-answer with no event (a
    # silently short answer to an SDK). The grace period lets ours end as the engine ends them,
    # with an error event: dhllm serve stops its engine first (helpers.background_server).
    return EventSourceResponse(_events(stream, request, model, include_usage), sep="\n",
                               headers={"Cache-Control": "no-cache"},
                               shutdown_grace_period=SHUTDOWN_GRACE_S)


async def _events(stream: Stream, request: Request, model: str,
                  include_usage: bool) -> AsyncIterator[str]:
    """A role chunk, content chunks as generated, a finish chunk, usage if asked, ``[DONE]``."""
    chunk_id, created = p.completion_id(), int(time.time())

    def event(choices: list[p.ChunkChoice], usage: p.Usage | None = None) -> str:
        chunk = p.ChatCompletionChunk(id=chunk_id, created=created, model=model,
                                      choices=choices, usage=usage)
        return chunk.model_dump_json(exclude_none=usage is None)

    # Content chunks are the hot path (one per token): the same JSON as the pydantic model,
    # with only the text spliced in, so a token costs one json.dumps of a short string.
    head, tail = event([p.ChunkChoice(delta=p.Delta(content="\x00"))]).split('"\\u0000"')
    try:
        yield event([p.ChunkChoice(delta=p.Delta(role="assistant", content=""))])
        async for piece in stream:
            yield head + json.dumps(piece, ensure_ascii=False) + tail
        finish = finish_of(stream)
        request.state.tokens = finish.completion_tokens
        yield event([p.ChunkChoice(delta=p.Delta(), finish_reason=finish_reason(finish))])
        if include_usage:
            yield event([], p.Usage.of(finish.prompt_tokens, finish.completion_tokens,
                                       finish.cached_tokens))
    except Exception as exc:  # headers are gone: report the error in the stream, as OpenAI does
        yield json.dumps({"error": map_exception(exc).detail().model_dump()})
    finally:
        stream.cancel()  # the client hung up (or we are done: then a no-op)
    yield "[DONE]"
