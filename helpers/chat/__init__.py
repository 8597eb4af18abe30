"""One ``ChatModel`` interface for every LLM: local transformers models and cloud APIs.

``get_chat_model`` is the one place that knows every backend. The rest of the package (server,
CLI, widgets) sees only ``ChatModel`` and the capabilities a backend declares.
"""

from __future__ import annotations

import os
from typing import Any

from helpers.chat.base import (
    ROLES,
    ChatModel,
    GenerationParams,
    Message,
    TokenBatchable,
    validate_messages,
)
from helpers.chat.cloud_common import explained
from helpers.chat.decoding import IncrementalDecoder, StopMatcher
from helpers.chat.gemini import GeminiChat
from helpers.chat.local import TransformersChat
from helpers.chat.openai_chat import OpenAIChat
from helpers.chat.presets import (
    GEMINI_DEFAULT_MODEL,
    GEMINI_KEY_ENVS,
    GEMINI_MODELS,
    PRESETS,
    Preset,
    get_preset,
)
from helpers.chat.prompts import (
    LINLY_PREFIX,
    LINLY_STOP,
    history_to_messages,
    is_linly_prompt,
    messages_to_pairs,
    parse_linly_prompt,
    render_linly_prompt,
)
from helpers.errors import (
    AuthenticationError,
    BadRequestError,
    ChatModelError,
    InvalidParamError,
    RateLimitError,
    UnavailableError,
)

__all__ = [
    "CLOUD_PREFIXES",
    "GEMINI_DEFAULT_MODEL",
    "GEMINI_MODELS",
    "LINLY_PREFIX",
    "LINLY_STOP",
    "PRESETS",
    "ROLES",
    "AuthenticationError",
    "BadRequestError",
    "ChatModel",
    "ChatModelError",
    "GeminiChat",
    "GenerationParams",
    "IncrementalDecoder",
    "InvalidParamError",
    "Message",
    "OpenAIChat",
    "Preset",
    "RateLimitError",
    "StopMatcher",
    "TokenBatchable",
    "TransformersChat",
    "UnavailableError",
    "get_chat_model",
    "get_cloud_model",
    "clouds_with_keys",
    "explained",
    "get_preset",
    "history_to_messages",
    "is_linly_prompt",
    "messages_to_pairs",
    "parse_linly_prompt",
    "render_linly_prompt",
    "validate_messages",
]

CLOUD_PREFIXES = ("gemini", *PRESETS)
# The chapter's order (Gemini, ChatGPT, ChatGLM), then the other providers reachable from China.
CLOUD_ORDER = ("gemini", "openai", "zhipu", "deepseek", "dashscope", "moonshot")


def clouds_with_keys(order: tuple[str, ...] = CLOUD_ORDER) -> list[str]:
    """The cloud providers whose API key is set (environment or Colab secrets), in ``order``."""
    from helpers.secrets import has_secret

    def key_envs(name: str) -> tuple[str, ...]:
        env = get_preset(name).key_env if name != "gemini" else None
        return GEMINI_KEY_ENVS if name == "gemini" else ((env,) if env else ())

    return [name for name in order if any(has_secret(env) for env in key_envs(name))]


def get_cloud_model(kind: str, model: str | None = None, **options: Any) -> ChatModel:
    """``gemini`` or a preset name, with a model name (the provider's default if empty)."""
    if kind == "gemini":
        return GeminiChat(model or None, **options)
    return OpenAIChat.from_preset(kind, model or None, **options)


def get_chat_model(spec: str, **options: Any) -> ChatModel:
    """Build a ChatModel from one string: ``local:NAME_OR_PATH``, a bare registry name or path,
    ``gemini:MODEL`` or an OpenAI-compatible preset ``PRESET:MODEL`` (openai, deepseek, zhipu,
    dashscope, moonshot, vllm, ollama, dhllm). An empty MODEL (``zhipu`` or ``zhipu:``) means the
    provider's default. Keyword options go to the backend (``api_key=``, ``base_url=``,
    ``timeout=`` for cloud models; ``device=``, ``dtype=`` for local ones).
    """
    kind, _, rest = spec.partition(":")
    if kind == "local":
        return TransformersChat.load(rest, **options)
    if kind in CLOUD_PREFIXES and not os.path.exists(spec):
        return get_cloud_model(kind, rest or None, **options)
    if not rest or len(kind) == 1:  # a bare name, or a Windows path like C:\models
        return TransformersChat.load(spec, **options)
    known = ", ".join(f"{p}:MODEL" for p in ("local", *CLOUD_PREFIXES))
    raise ValueError(f"unknown backend {kind!r} in {spec!r}; known: {known}, or a bare "
                     f"registry name or path")
