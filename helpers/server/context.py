"""What every route shares: the engine, the settings, the limits and the request plumbing.

One object per app (no module globals): routes reach it as ``request.app.state.ctx``. The
mapping from a request's fields to ``GenerationParams`` lives here once, for both contracts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from helpers.chat.base import ChatModel, GenerationParams
from helpers.config import Settings
from helpers.server.engine import Engine, Finish, Stream
from helpers.server.errors import APIError, map_exception


@dataclass(frozen=True)
class Defaults:
    """Sampling defaults for fields a request leaves out (each contract has its own)."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


@dataclass
class ServerContext:
    """The engine, settings and model one app serves."""

    chat_model: ChatModel
    engine: Engine
    settings: Settings

    @property
    def model_name(self) -> str:
        return getattr(self.chat_model, "name", "model")

    def check_size(self, texts: list[str], param: str) -> None:
        """413 when the prompt is over ``max_prompt_chars``."""
        size = sum(len(t) for t in texts)
        limit = self.settings.max_prompt_chars
        if size > limit:
            raise APIError(413, f"{param} is too long: {size} characters, the limit is {limit} "
                                f"(DHLLM_MAX_PROMPT_CHARS)", param)

    def params(self, defaults: Defaults, *, max_tokens: int | None, max_tokens_param: str,
               **fields: Any) -> GenerationParams:
        """GenerationParams from a request's fields; None means "the contract's default"."""
        cap = self.settings.max_new_tokens_cap
        if max_tokens is not None and max_tokens > cap:
            raise APIError(422, f"{max_tokens_param} must be at most {cap} "
                                f"(DHLLM_MAX_NEW_TOKENS_CAP); got {max_tokens}", max_tokens_param)
        values = {name: fields.get(name) for name in ("temperature", "top_p", "top_k",
                                                      "repetition_penalty")}
        for name, value in values.items():
            if value is None:
                values[name] = getattr(defaults, name)
        try:
            return GenerationParams(
                max_new_tokens=self.settings.default_max_new_tokens if max_tokens is None
                else max_tokens,
                seed=fields.get("seed"), stop=fields.get("stop") or (), **values,
            )
        except ValueError as exc:
            raise map_exception(exc) from exc

    def submit(self, request: Request, messages: list[dict[str, str]], params: GenerationParams,
               prompt_text: str | None = None) -> Stream:
        """Queue a request on the engine; its errors become HTTP errors."""
        if self.settings.log_prompts:
            request.state.prompt = prompt_text or messages[-1]["content"]
        try:
            return self.engine.submit(messages, params, prompt_text=prompt_text)
        except Exception as exc:
            raise map_exception(exc) from exc


def finish_of(stream: Stream) -> Finish:
    """How a stream ended; only called once its text has been read to the end."""
    if stream.finish is None:  # the engine always closes a stream it has emptied
        raise APIError(500, "internal error: the stream ended without a finish")
    return stream.finish


async def collect(stream: Stream, request: Request) -> str:
    """The whole reply; a client that hangs up cancels its generation."""
    stream.buffered = True  # nothing reaches the client before the end: a retry is invisible

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                stream.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        text = await stream.text()
    except Exception as exc:
        raise map_exception(exc) from exc
    finally:
        watcher.cancel()
    request.state.tokens = finish_of(stream).completion_tokens
    return text


def finish_reason(finish: Finish) -> str:
    """OpenAI's finish_reason: only "length" and "stop" exist there."""
    return "length" if finish.reason == "length" else "stop"
