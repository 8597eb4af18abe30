"""Request and response models of both contracts (as vLLM's ``entrypoints/openai/protocol.py``).

- The chapter's ``POST /``: ``{"prompt", "history", "max_length", "top_p", "temperature"}`` in,
  ``{"response", "history", "status", "time"}`` out.
- OpenAI's ``POST /v1/chat/completions`` and ``GET /v1/models``.

Pydantic checks types and ranges, so every bad field comes back as a 4xx that names it. Limits
that depend on settings (the token cap, the prompt size) are checked in ``context.py``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

# The chapter's sampling defaults (its api.py), used where a POST / request leaves a field out.
CHAPTER_TEMPERATURE = 0.84
CHAPTER_TOP_K = 20
CHAPTER_REPETITION_PENALTY = 1.15
CHAPTER_TOP_P = 1.0

Probability = Annotated[float, Field(gt=0, le=1)]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


# ---------------------------------------------------------------------------------------------
# Contract 1: the chapter's POST /.


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChapterRequest(BaseModel):
    """The chapter's request; ``history`` takes ``[[user, assistant], ...]`` or role dicts."""

    model_config = ConfigDict(
        extra="ignore",  # Linly-Talker's clients may send more; unknown fields are harmless
        json_schema_extra={"examples": [{"prompt": "如何应对压力"}]},
    )

    prompt: str = Field(description="the user's message (or a full Linly-template prompt)")
    history: list[Annotated[list[str], Field(min_length=2, max_length=2)] | Message] | None = Field(
        default=None, description="earlier turns: [[user, assistant], ...] or [{role, content}, ...]"
    )
    max_length: StrictInt | None = Field(
        default=None, gt=0,
        description="most new tokens; default: the server's default_max_new_tokens (256), not "
                    "the chapter's 2048, which takes minutes per request on a CPU",
    )
    top_p: Probability | None = None
    temperature: float | None = Field(default=None, ge=0, description="0 = greedy")
    top_k: StrictInt | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)

    _prompt_not_blank = field_validator("prompt")(_not_blank)


class ChapterResponse(BaseModel):
    """The chapter's response."""

    response: str
    history: list[list[str]]
    status: int = 200
    time: str


# ---------------------------------------------------------------------------------------------
# Contract 2: OpenAI chat completions.


class TextPart(BaseModel):
    """A text part of a message's content (OpenAI's list form)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """An OpenAI message; ``developer`` counts as ``system``, text parts are joined."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"model": "embedded", "messages": [{"role": "user", "content": "Hi"}]}]
        },
    )

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: StrictInt | None = Field(default=None, gt=0)
    max_completion_tokens: StrictInt | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: Probability | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    n: StrictInt = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    # Extensions, as vLLM accepts them.
    top_k: StrictInt | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if len(items) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        return value


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (as OpenAI)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0) -> Usage:
        """Usage with the total filled in."""
        return cls(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dhllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


class ReplicasHealth(BaseModel):
    """vLLM replicas behind vllm-router (``--replicas N``, or several ``DHLLM_VLLM_URL``)."""

    total: int
    healthy: int
    hung: int = 0  # answer /health but generate nothing (out of routing until they do)
    restarts: int = 0  # replicas that died (or hung) and were started again
    retried: int = 0  # requests sent again after a replica failed them
    continued: int = 0  # streams cut by a failed replica and continued on another
    policy: str  # the router's
    router: str = "up"  # "up", "down" (dead or hung) or "restarting"
    router_restarts: int = 0


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    engine: str
    stats: dict[str, Any]
    replicas: ReplicasHealth | None = None
