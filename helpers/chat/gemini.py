"""``GeminiChat``: Google Gemini via ``google-genai`` (``google-generativeai`` is end-of-life).

``gemini-pro`` is retired; with no model given, the first of ``GEMINI_MODELS`` that
``models.list()`` still offers is used. Where it is pointed:
``base_url=`` or ``GOOGLE_GEMINI_BASE_URL`` (read by google-genai); Google's default URL is never
passed explicitly, since an explicit one would win over the variable. Retries: tenacity around
the SDK (429, 408, 5xx, transport errors), honouring the server's delay, because google-genai's
``HttpRetryOptions`` ignores it. The SDK is imported only when a backend is built.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from helpers.chat.base import ChatModel, GenerationParams, Message, validate_messages
from helpers.chat.cloud_common import (
    DEFAULT_MAX_RETRIES,
    MAX_RETRY_AFTER,
    cloud_timeouts,
    models_hint,
    no_answer_message,
    pick_model,
    retry_after_header,
    safe_url,
    status_error,
    warn_dropped,
)
from helpers.chat.presets import GEMINI_DEFAULT_MODEL, GEMINI_KEY_ENVS, GEMINI_MODELS
from helpers.errors import BadRequestError, UnavailableError
from helpers.secrets import MissingSecretError, get_secret, has_secret, redact

log = logging.getLogger(__name__)


class GeminiChat(ChatModel):
    """Google Gemini via ``google-genai``: history as ``contents`` (roles user/model), system
    prompt as ``system_instruction``.

    Thinking is kept to a minimum by default on Flash models: a digital human wants short, fast
    answers, and thinking tokens count against ``max_new_tokens`` (answers came back empty).
    Gemini 2.5 takes a token budget (0 = off), Gemini 3 a level ("minimal" on Flash; the two
    must not be sent together: https://ai.google.dev/gemini-api/docs/gemini-3). Pass
    ``thinking_budget=None`` to keep the model's own default. repetition_penalty has no
    Gemini equivalent and is dropped (logged once at INFO).
    """

    def __init__(
        self,
        model: str | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        name: str | None = None,
        api_version: str | None = None,
        thinking_budget: int | None | str = "auto",
        **client_options: Any,
    ) -> None:
        from google import genai
        from google.genai import types

        self.model = model or GEMINI_DEFAULT_MODEL
        self._resolved = bool(model)  # a name the caller chose is used as given
        self._fixed_name = name
        self.thinking_budget = thinking_budget
        self.name = name or f"gemini:{self.model}"
        # None: DHLLM_CLOUD_TIMEOUT. google-genai takes one timeout for connect and read alike.
        self.timeout, _ = cloud_timeouts(timeout)
        self.max_retries = max_retries
        self.thinking = _thinking_config(self.model, thinking_budget)
        key = api_key or self._key_from_secrets()  # raises MissingSecretError before any request
        self._secrets = (key,)
        self._warned: set[str] = set()
        http_options = types.HttpOptions(
            timeout=int(self.timeout * 1000),  # milliseconds (HttpOptions' own docstring)
            # No base_url unless given: an explicit one would override GOOGLE_GEMINI_BASE_URL.
            **({"base_url": base_url} if base_url else {}),
            **({"api_version": api_version} if api_version else {}),
        )
        # vertexai=False: an API key means the Gemini Developer API, whatever the environment says.
        self.client = genai.Client(api_key=key, vertexai=False, http_options=http_options,
                                   **client_options)
        self.base_url = base_url or os.environ.get("GOOGLE_GEMINI_BASE_URL") or None

    @staticmethod
    def _key_from_secrets() -> str:
        for env in GEMINI_KEY_ENVS:
            if has_secret(env):
                return get_secret(env)
        raise MissingSecretError(GEMINI_KEY_ENVS[0], purpose="the Gemini API (GOOGLE_API_KEY "
                                 "works too)")

    def __repr__(self) -> str:
        where = f", base_url={safe_url(self.base_url)!r}" if self.base_url else ""
        return f"GeminiChat(name={self.name!r}{where})"

    def available_models(self) -> list[str]:
        """Model names from ``models.list()`` without ``models/``; empty when listing fails."""
        try:
            return sorted((m.name or "").removeprefix("models/") for m in self.client.models.list())
        except Exception:  # a proxy or stand-in without ListModels: not worth failing a chat
            return []

    def resolve_model(self) -> str:
        """The first of ``GEMINI_MODELS`` still listed (said in a warning when it is not the first
        choice); BadRequestError naming the listed models when none of them is."""
        if self._resolved:
            return self.model
        available = self.available_models()
        self._resolved = True
        if not available or self.model in available:
            return self.model
        chosen = pick_model(GEMINI_MODELS, available)
        if chosen is None:
            raise BadRequestError(f"Gemini 的模型列表里没有 {', '.join(GEMINI_MODELS)} 中的任何一个。"
                                  f"{models_hint(available)}请指定一个：gemini:模型名 / Gemini "
                                  f"lists none of the preferred models")
        log.warning("Gemini 的模型列表里没有 %s（已退役？），改用 %s", self.model, chosen)
        self.model = chosen
        self.name = self._fixed_name or f"gemini:{chosen}"
        self.thinking = _thinking_config(chosen, self.thinking_budget)
        return chosen

    def _request(self, messages: Sequence[Message], params: dict[str, Any]) -> dict[str, Any]:
        from google.genai import types

        gen = GenerationParams.from_kwargs(**params)
        messages = validate_messages(messages)
        model = self.resolve_model()
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        contents = [
            types.Content(role="model" if m["role"] == "assistant" else "user",
                          parts=[types.Part(text=m["content"])])
            for m in messages if m["role"] != "system"
        ]
        warn_dropped(self.name, gen, ("top_k",), self._warned)
        config = types.GenerateContentConfig(
            system_instruction=system or None,
            max_output_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p if gen.top_p < 1 else None,
            top_k=gen.top_k or None,
            seed=gen.seed,
            stop_sequences=list(gen.stop) or None,
            thinking_config=types.ThinkingConfig(**self.thinking) if self.thinking else None,
        )
        return {"model": model, "contents": contents, "config": config}

    def chat(self, messages: Sequence[Message], **params: Any) -> str:
        """The whole answer from one ``generate_content`` call."""
        request = self._request(messages, params)
        try:
            response = self._retrying(lambda: self.client.models.generate_content(**request))
        except Exception as exc:
            raise self._error(exc) from None
        return response.text or ""

    def stream(self, messages: Sequence[Message], **params: Any) -> Iterator[str]:
        """Yield text pieces from ``generate_content_stream`` (SSE)."""
        request = self._request(messages, params)

        def open_stream() -> tuple[Any, Any]:
            # The request is sent on the first next(): retry up to there, never mid-answer.
            chunks = iter(self.client.models.generate_content_stream(**request))
            return chunks, next(chunks, None)

        try:
            chunks, first = self._retrying(open_stream)
            if first is None:
                return
            if first.text:
                yield first.text
            for chunk in chunks:
                if chunk.text:
                    yield chunk.text
        except Exception as exc:
            raise self._error(exc) from None

    def _retrying(self, call: Callable[[], Any]) -> Any:
        """``call()`` retried on 429/408/5xx and transport errors, waiting as the server asks."""
        import tenacity

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            retry=tenacity.retry_if_exception(_gemini_retryable),
            wait=_WaitRetryAfter(tenacity.wait_exponential_jitter(initial=0.5, max=8.0)),
            reraise=True,
        )
        return retrying(call)

    def _error(self, exc: Exception) -> Exception:
        from google.genai import errors

        where = f"{self.name}" + (f" at {safe_url(self.base_url)}" if self.base_url else "")
        if isinstance(exc, _transport_errors()):
            waited = self.timeout if "timeout" in type(exc).__name__.lower() else None
            return UnavailableError(no_answer_message(where, "gemini", waited))
        if not isinstance(exc, errors.APIError):
            return exc
        provider = redact(str(exc.message or exc.status or ""), *self._secrets)
        # Google answers a bad key with 400 INVALID_ARGUMENT and reason API_KEY_INVALID.
        bad_key = exc.code == 400 and "API_KEY_INVALID" in str(exc.details)
        available = self.available_models() if exc.code == 404 else ()
        return status_error(exc.code, where, provider, _gemini_retry_after(exc),
                             "GEMINI_API_KEY (or GOOGLE_API_KEY)", bad_key=bad_key,
                             available=available)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """httpx's (and httpx2's) timeout and connection errors, whichever google-genai uses."""
    classes = []
    for module in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError, AttributeError):
            classes.append(importlib.import_module(module).TransportError)
    return tuple(classes)


def _gemini_retryable(exc: BaseException) -> bool:
    from google.genai import errors

    if isinstance(exc, errors.APIError):
        return exc.code in (408, 429) or exc.code >= 500
    return isinstance(exc, _transport_errors())


def _gemini_retry_after(exc: BaseException) -> float | None:
    """The server's requested delay: a Retry-After header, or Google's RetryInfo retryDelay."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    delay = retry_after_header(headers) if headers is not None else None
    if delay is not None:
        return delay
    details = getattr(exc, "details", None)
    error = details.get("error", details) if isinstance(details, dict) else {}
    for item in error.get("details", []) if isinstance(error, dict) else []:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("RetryInfo"):
            match = re.fullmatch(r"([\d.]+)s", str(item.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


class _WaitRetryAfter:
    """A tenacity wait: the server's delay when it gives one (up to a minute), else backoff.

    Hand-written because tenacity has no wait that reads a delay off the exception.
    """

    def __init__(self, fallback: Callable[[Any], float]) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: Any) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        delay = _gemini_retry_after(exc) if exc is not None else None
        if delay is not None and 0 < delay <= MAX_RETRY_AFTER:
            return delay
        return self.fallback(retry_state)


def _thinking_config(model: str, budget: int | str | None) -> dict[str, Any]:
    """ThinkingConfig fields: as asked, else the least thinking the model allows (Flash only)."""
    if budget != "auto":
        return {} if budget is None else {"thinking_budget": budget}
    if model.startswith("gemini-2.5-flash"):
        return {"thinking_budget": 0}
    if model.startswith("gemini-3") and "flash" in model:
        return {"thinking_level": "MINIMAL"}
    return {}
