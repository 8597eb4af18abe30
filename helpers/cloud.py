"""Cloud LLMs behind ``ChatModel``: any OpenAI-compatible API (presets by name) and Gemini.

- ``OpenAIChat`` uses the official ``openai`` SDK (>= 1.0; ``openai.ChatCompletion`` is gone).
  Presets give base URL, default model and key variable for OpenAI, DeepSeek, Zhipu GLM,
  DashScope (Qwen), Moonshot, and local servers (vLLM, Ollama, our own ``dhllm serve``).
- ``GeminiChat`` uses ``google-genai`` (``google-generativeai`` is end-of-life).

Where each one is pointed (tests, proxies, notebook 04's fakes):

- ``openai``: ``base_url=`` or ``OPENAI_BASE_URL`` (read by the SDK itself);
- any preset, ``openai`` included: ``DHLLM_<PRESET>_BASE_URL``, e.g. ``DHLLM_ZHIPU_BASE_URL``;
- Gemini: ``base_url=`` or ``GOOGLE_GEMINI_BASE_URL`` (read by google-genai). We never pass
  Google's default URL explicitly, since an explicit one would win over the variable.

An explicit ``base_url=`` always wins. Keys come from ``helpers.secrets.get_secret`` (environment,
then Colab secrets) and are checked in ``__init__``: a missing key fails before any request.

Retries: 429, 408 and 5xx are retried with exponential backoff, honouring ``Retry-After``
(OpenAI: the SDK's own ``max_retries``; Gemini: tenacity around the SDK, since google-genai's
``HttpRetryOptions`` ignores the server's delay). Other 4xx fail at once. Every call has a
timeout. Failures surface as ``helpers.chat`` errors with the provider's message, keys removed.

The SDKs are imported only when a backend is built, so ``import helpers.cloud`` stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from helpers.chat import (
    AuthenticationError,
    BadRequestError,
    ChatModel,
    ChatModelError,
    GenerationParams,
    Message,
    RateLimitError,
    UnavailableError,
    validate_messages,
)
from helpers.secrets import KEY_SOURCES, MissingSecretError, get_secret, has_secret, redact

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds, for each HTTP request
DEFAULT_MAX_RETRIES = 3
MAX_RETRY_AFTER = 60.0  # a longer server-requested wait is not worth blocking a chat for


@dataclass(frozen=True)
class Preset:
    """An OpenAI-compatible provider: where it is, which model by default, which key."""

    name: str
    base_url: str | None  # None: the openai SDK's default (OPENAI_BASE_URL or api.openai.com)
    default_model: str
    key_env: str | None  # the variable holding the key
    key_required: bool = True
    key_url: str | None = None  # where to get a key
    # GenerationParams the OpenAI protocol lacks but this server takes as extra body fields.
    extra_params: tuple[str, ...] = ()
    note: str = ""

    @property
    def base_url_env(self) -> str:
        """The environment variable that overrides this preset's base URL."""
        return f"DHLLM_{self.name.upper()}_BASE_URL"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("openai", None, "gpt-4o-mini", "OPENAI_API_KEY",
               key_url="https://platform.openai.com/api-keys", note="ChatGPT"),
        Preset("deepseek", "https://api.deepseek.com", "deepseek-chat", "DEEPSEEK_API_KEY",
               key_url="https://platform.deepseek.com/api_keys"),
        Preset("zhipu", "https://open.bigmodel.cn/api/paas/v4/", "glm-4-flash", "ZHIPUAI_API_KEY",
               key_url="https://open.bigmodel.cn/usercenter/apikeys",
               note="ChatGLM's maker; glm-4-flash is free of charge"),
        Preset("dashscope", "https://dashscope.aliyuncs.com/compatible-mode/v1", "qwen-plus",
               "DASHSCOPE_API_KEY", key_url="https://help.aliyun.com/zh/model-studio/get-api-key",
               extra_params=("top_k", "repetition_penalty"), note="Qwen, OpenAI-compatible mode"),
        Preset("moonshot", "https://api.moonshot.cn/v1", "moonshot-v1-8k", "MOONSHOT_API_KEY",
               key_url="https://platform.moonshot.cn/console/api-keys", note="Kimi"),
        Preset("vllm", "http://127.0.0.1:8000/v1", "default", "VLLM_API_KEY", key_required=False,
               extra_params=("top_k", "repetition_penalty"),
               note="vllm serve MODEL; the model name is what vLLM serves (see /v1/models)"),
        Preset("ollama", "http://127.0.0.1:11434/v1", "qwen2.5:1.5b", None, key_required=False,
               note="ollama serve; needs no key"),
        Preset("dhllm", "http://127.0.0.1:7871/v1", "embedded", "DHLLM_API_KEY",
               key_required=False, extra_params=("top_k", "repetition_penalty"),
               note="our own dhllm serve; a key only if the server was started with one"),
    ]
}

GEMINI_DEFAULT_MODEL = "gemini-2.5-flash"
GEMINI_KEY_ENVS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def _safe_url(url: str | None) -> str | None:
    """A URL without user:password@ (never shown)."""
    return re.sub(r"//[^/@]*@", "//", url) if url else url


def _warn_dropped(provider: str, gen: GenerationParams, supported: Sequence[str],
                  warned: set[str]) -> list[str]:
    """Non-default params this provider cannot take: dropped, logged once per backend at INFO
    (not a warning: the chapter's POST / sends its top_k and repetition_penalty every time)."""
    defaults = GenerationParams()
    dropped = [
        name for name in ("top_k", "repetition_penalty")
        if getattr(gen, name) != getattr(defaults, name) and name not in supported
    ]
    new = [name for name in dropped if name not in warned]
    if new:
        warned.update(new)
        log.info("%s has no %s: ignored", provider, " / ".join(new))
    return dropped


# ---------------------------------------------------------------------------------------------
# OpenAI and every OpenAI-compatible server.


class OpenAIChat(ChatModel):
    """A model behind any OpenAI-compatible chat completions API, via the official SDK.

    Parameters map as max_new_tokens -> max_tokens, temperature, top_p (sent when < 1), seed,
    stop. top_k and repetition_penalty are not in the OpenAI protocol: they go as extra body
    fields to servers that take them (vLLM, DashScope, dhllm) and are dropped elsewhere
    (logged once at INFO).
    """

    def __init__(
        self,
        model: str | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        name: str | None = None,
        preset: str | Preset = "openai",
        **client_options: Any,
    ) -> None:
        import openai  # lazily: importing helpers must not import the SDKs

        self.preset = preset if isinstance(preset, Preset) else get_preset(preset)
        self.model = model or self.preset.default_model
        self.name = name or f"{self.preset.name}:{self.model}"
        # Explicit > DHLLM_<PRESET>_BASE_URL > preset default (None: the SDK reads OPENAI_BASE_URL).
        self.base_url = base_url or os.environ.get(self.preset.base_url_env) or self.preset.base_url
        self.timeout = timeout
        key = api_key or self._key_from_secrets()  # raises MissingSecretError before any request
        self._secrets = (key,)
        self._warned: set[str] = set()
        self.client = openai.OpenAI(
            api_key=key,
            base_url=self.base_url,
            timeout=timeout,
            max_retries=max_retries,  # the SDK backs off exponentially and honours Retry-After
            **client_options,
        )
        self.base_url = str(self.client.base_url)

    @classmethod
    def from_preset(cls, name: str, model: str | None = None, **kwargs: Any) -> OpenAIChat:
        """A backend for preset ``name`` (openai, deepseek, zhipu, ...), its default model unless given."""
        return cls(model, preset=name, **kwargs)

    def _key_from_secrets(self) -> str:
        env = self.preset.key_env
        if env and (self.preset.key_required or has_secret(env)):
            purpose = None if env in KEY_SOURCES else f"the {self.preset.name} API"
            return get_secret(env, purpose=purpose)
        return "not-needed"  # local servers without auth; the SDK insists on some key

    def __repr__(self) -> str:
        return f"OpenAIChat(name={self.name!r}, base_url={_safe_url(self.base_url)!r})"

    def _request(self, messages: Sequence[Message], params: dict[str, Any]) -> dict[str, Any]:
        gen = GenerationParams.from_kwargs(**params)
        request: dict[str, Any] = {
            "model": self.model,
            "messages": validate_messages(messages),
            "max_tokens": gen.max_new_tokens,
            "temperature": gen.temperature,
        }
        if gen.top_p < 1:
            request["top_p"] = gen.top_p
        if gen.seed is not None:
            request["seed"] = gen.seed
        if gen.stop:
            request["stop"] = list(gen.stop)
        dropped = _warn_dropped(self.name, gen, self.preset.extra_params, self._warned)
        extra = {
            name: getattr(gen, name) for name in ("top_k", "repetition_penalty")
            if name in self.preset.extra_params and name not in dropped
            and getattr(gen, name) != getattr(GenerationParams(), name)
        }
        if extra:
            request["extra_body"] = extra
        return request

    def chat(self, messages: Sequence[Message], **params: Any) -> str:
        """The whole answer from one non-streaming request."""
        request = self._request(messages, params)
        try:
            response = self.client.chat.completions.create(**request)
        except Exception as exc:
            raise self._error(exc) from None  # from None: the SDK's text may carry the key
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""

    def stream(self, messages: Sequence[Message], **params: Any) -> Iterator[str]:
        """Yield text pieces from a streaming (SSE) request."""
        request = self._request(messages, params)
        try:
            chunks = self.client.chat.completions.create(stream=True, **request)
        except Exception as exc:
            raise self._error(exc) from None
        with chunks:
            try:
                for chunk in chunks:
                    for choice in chunk.choices:  # some servers send a last chunk with no choices
                        if choice.delta and choice.delta.content:
                            yield choice.delta.content
            except Exception as exc:
                raise self._error(exc) from None

    def _error(self, exc: Exception) -> Exception:
        """Our exception for an SDK exception, provider message kept, keys removed."""
        import openai

        where = f"{self.name} at {_safe_url(self.base_url)}"
        if isinstance(exc, openai.APITimeoutError):
            return UnavailableError(f"{where}: no answer within {self.timeout:g} s (timeout)")
        if isinstance(exc, openai.APIConnectionError):
            return UnavailableError(f"{where}: cannot connect; is the server running and the "
                                    f"base URL right?")
        if not isinstance(exc, openai.APIError):
            return exc  # a bug or a ValueError of ours: not the provider's fault
        body = exc.body
        text = body.get("message") if isinstance(body, dict) else None
        provider = redact(str(text or exc.message), *self._secrets)
        status = getattr(exc, "status_code", None)
        retry_after = None
        response = getattr(exc, "response", None)
        if response is not None:
            retry_after = _retry_after_header(response.headers)
        return _status_error(status, where, provider, retry_after, self.preset.key_env)


def _retry_after_header(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds; HTTP dates are ignored)."""
    for header, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = headers.get(header) if headers is not None else None
        if value is None:
            continue
        try:
            return float(value) / divisor
        except ValueError:
            continue
    return None


def _status_error(status: int | None, where: str, provider: str, retry_after: float | None,
                  key_env: str | None, bad_key: bool = False) -> ChatModelError:
    """Map an HTTP status to our exception classes."""
    said = f"{where} answered {status}: {provider.rstrip('.')}"
    if status in (401, 403) or bad_key:
        key = f" Check {key_env}." if key_env else ""
        return AuthenticationError(f"{said}.{key}", provider_message=provider)
    if status == 429:
        return RateLimitError(f"{said} (rate limit or quota; retries ran out)",
                              provider_message=provider, retry_after=retry_after)
    if status is not None and (status >= 500 or status == 408):
        return UnavailableError(f"{said} (retries ran out)", provider_message=provider,
                                retry_after=retry_after)
    if status is not None and 400 <= status < 500:
        hint = " (is the model name right?)" if status == 404 else ""
        return BadRequestError(f"{said}{hint}", provider_message=provider)
    return ChatModelError(said, provider_message=provider)


# ---------------------------------------------------------------------------------------------
# Gemini.


class GeminiChat(ChatModel):
    """Google Gemini via ``google-genai``: history as ``contents`` (roles user/model), system
    prompt as ``system_instruction``.

    ``thinking_budget`` defaults to 0 for gemini-2.5-flash*: a digital human wants short, fast
    answers, and thinking tokens would count against ``max_new_tokens`` (answers came back empty).
    Pass ``thinking_budget=None`` to keep the model's own default. repetition_penalty has no
    Gemini equivalent and is dropped (logged once at INFO).
    """

    def __init__(
        self,
        model: str = GEMINI_DEFAULT_MODEL,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        name: str | None = None,
        api_version: str | None = None,
        thinking_budget: int | None | str = "auto",
        **client_options: Any,
    ) -> None:
        from google import genai
        from google.genai import types

        self.model = model or GEMINI_DEFAULT_MODEL
        self.name = name or f"gemini:{self.model}"
        self.timeout = timeout
        self.max_retries = max_retries
        if thinking_budget == "auto":
            thinking_budget = 0 if self.model.startswith("gemini-2.5-flash") else None
        self.thinking_budget = thinking_budget
        key = api_key or self._key_from_secrets()  # raises MissingSecretError before any request
        self._secrets = (key,)
        self._warned: set[str] = set()
        http_options = types.HttpOptions(
            timeout=int(timeout * 1000),  # milliseconds
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
        where = f", base_url={_safe_url(self.base_url)!r}" if self.base_url else ""
        return f"GeminiChat(name={self.name!r}{where})"

    def _request(self, messages: Sequence[Message], params: dict[str, Any]) -> dict[str, Any]:
        from google.genai import types

        gen = GenerationParams.from_kwargs(**params)
        messages = validate_messages(messages)
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        contents = [
            types.Content(role="model" if m["role"] == "assistant" else "user",
                          parts=[types.Part(text=m["content"])])
            for m in messages if m["role"] != "system"
        ]
        _warn_dropped(self.name, gen, ("top_k",), self._warned)
        config = types.GenerateContentConfig(
            system_instruction=system or None,
            max_output_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p if gen.top_p < 1 else None,
            top_k=gen.top_k or None,
            seed=gen.seed,
            stop_sequences=list(gen.stop) or None,
            thinking_config=(types.ThinkingConfig(thinking_budget=self.thinking_budget)
                             if self.thinking_budget is not None else None),
        )
        return {"model": self.model, "contents": contents, "config": config}

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

        where = f"{self.name}" + (f" at {_safe_url(self.base_url)}" if self.base_url else "")
        if isinstance(exc, _transport_errors()):
            if "timeout" in type(exc).__name__.lower():
                return UnavailableError(f"{where}: no answer within {self.timeout:g} s (timeout)")
            return UnavailableError(f"{where}: cannot connect ({type(exc).__name__}); is the "
                                    f"base URL right?")
        if not isinstance(exc, errors.APIError):
            return exc
        provider = redact(str(exc.message or exc.status or ""), *self._secrets)
        # Google answers a bad key with 400 INVALID_ARGUMENT and reason API_KEY_INVALID.
        bad_key = exc.code == 400 and "API_KEY_INVALID" in str(exc.details)
        return _status_error(exc.code, where, provider, _gemini_retry_after(exc),
                             "GEMINI_API_KEY (or GOOGLE_API_KEY)", bad_key=bad_key)


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
    delay = _retry_after_header(headers) if headers is not None else None
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


# ---------------------------------------------------------------------------------------------
# One string picks a cloud backend (helpers.chat.get_chat_model delegates here).

CLOUD_PREFIXES = ("gemini", *PRESETS)


def get_cloud_model(kind: str, model: str | None = None, **options: Any) -> ChatModel:
    """``gemini`` or a preset name, with a model name (the provider's default if empty)."""
    if kind == "gemini":
        return GeminiChat(model or GEMINI_DEFAULT_MODEL, **options)
    return OpenAIChat.from_preset(kind, model or None, **options)
