"""``OpenAIChat``: OpenAI and every OpenAI-compatible API, via the official ``openai`` SDK (>= 1.0).

``openai.ChatCompletion`` was removed in 1.0. Presets (``helpers.chat.presets``) give base URL,
default models and key variable for OpenAI, DeepSeek, Zhipu GLM, DashScope (Qwen), Moonshot, and
local servers (vLLM, Ollama, our own ``dhllm serve``). Where it is pointed: ``base_url=``, else
``DHLLM_<PRESET>_BASE_URL``, else the preset's (for ``openai``: ``OPENAI_BASE_URL``, read by the
SDK itself). Retries: the SDK's own ``max_retries`` (429, 408, 5xx; honours ``Retry-After``).
With no model given, the preset's first model the provider still lists is used (names retire).
The SDK is imported only when a backend is built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from helpers.chat.base import ChatModel, GenerationParams, Message, validate_messages
from helpers.chat.cloud_common import (
    DEFAULT_MAX_RETRIES,
    cloud_timeouts,
    models_hint,
    no_answer_message,
    pick_model,
    retry_after_header,
    safe_url,
    status_error,
    warn_dropped,
)
from helpers.chat.presets import Preset, get_preset
from helpers.errors import BadRequestError, UnavailableError
from helpers.secrets import KEY_SOURCES, get_secret, has_secret, redact

log = logging.getLogger(__name__)


class OpenAIChat(ChatModel):
    """A model behind any OpenAI-compatible chat completions API, via the official SDK.

    Parameters map as max_new_tokens -> max_tokens, temperature, top_p (sent when < 1), seed,
    stop. top_k and repetition_penalty are not in the OpenAI protocol: they go as extra body
    fields to servers that take them (vLLM, DashScope, dhllm) and are dropped elsewhere
    (logged once at INFO). Without ``model``, ``resolve_model`` runs before the first request.
    """

    def __init__(
        self,
        model: str | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        name: str | None = None,
        preset: str | Preset = "openai",
        **client_options: Any,
    ) -> None:
        import openai  # lazily: importing helpers must not import the SDKs

        self.preset = preset if isinstance(preset, Preset) else get_preset(preset)
        self.model = model or self.preset.default_model
        self._resolved = bool(model)  # a name the caller chose is used as given
        self._fixed_name = name
        self.name = name or f"{self.preset.name}:{self.model}"
        # Explicit > DHLLM_<PRESET>_BASE_URL > preset default (None: the SDK reads OPENAI_BASE_URL).
        self.base_url = base_url or os.environ.get(self.preset.base_url_env) or self.preset.base_url
        # None: DHLLM_CLOUD_TIMEOUT. A short connect part: a blocked host fails in seconds.
        self.timeout, connect = cloud_timeouts(timeout)
        key = api_key or self._key_from_secrets()  # raises MissingSecretError before any request
        self._secrets = (key,)
        self._warned: set[str] = set()
        self.client = openai.OpenAI(
            api_key=key,
            base_url=self.base_url,
            timeout=openai.Timeout(self.timeout, connect=connect),  # the SDK's own httpx
            max_retries=max_retries,  # the SDK backs off exponentially and honours Retry-After
            **client_options,
        )
        self.base_url = str(self.client.base_url)

    @classmethod
    def from_preset(cls, preset: str, model: str | None = None, **kwargs: Any) -> OpenAIChat:
        """A backend for ``preset`` (openai, deepseek, zhipu, ...), its default model unless given."""
        return cls(model, preset=preset, **kwargs)

    def _key_from_secrets(self) -> str:
        env = self.preset.key_env
        if env and (self.preset.key_required or has_secret(env)):
            purpose = None if env in KEY_SOURCES else f"the {self.preset.name} API"
            return get_secret(env, purpose=purpose)
        return "not-needed"  # local servers without auth; the SDK insists on some key

    def __repr__(self) -> str:
        return f"OpenAIChat(name={self.name!r}, base_url={safe_url(self.base_url)!r})"

    def available_models(self) -> list[str]:
        """Model ids from the provider's ``models.list()``; empty when it has none or fails."""
        try:
            return sorted(m.id for m in self.client.models.list())
        except Exception:  # some compatible servers have no /models: not worth failing a chat
            return []

    def resolve_model(self) -> str:
        """The preset's first model the provider still lists (said in a warning when it is not
        the first choice); BadRequestError naming the listed models when none of them is."""
        if self._resolved:
            return self.model
        available = self.available_models()
        self._resolved = True
        if not available or self.model in available:
            return self.model
        chosen = pick_model(self.preset.models, available)
        if chosen is None and not self.preset.key_required:
            chosen = available[0]  # a local server (vLLM, Ollama, dhllm) serves its own name
        if chosen is None:
            raise BadRequestError(
                f"{self.preset.name}（{safe_url(self.base_url)}）的模型列表里没有 "
                f"{', '.join(self.preset.models)} 中的任何一个。{models_hint(available)}"
                f"请指定一个：{self.preset.name}:模型名 / lists none of the preset's models")
        log.warning("%s 的模型列表里没有 %s（已退役？），改用 %s", self.preset.name, self.model, chosen)
        self.model = chosen
        self.name = self._fixed_name or f"{self.preset.name}:{chosen}"
        return chosen

    def _request(self, messages: Sequence[Message], params: dict[str, Any]) -> dict[str, Any]:
        gen = GenerationParams.from_kwargs(**params)
        messages = validate_messages(messages)  # bad input fails before any request
        request: dict[str, Any] = {
            "model": self.resolve_model(),
            "messages": messages,
            "max_tokens": gen.max_new_tokens,
            "temperature": gen.temperature,
        }
        if gen.top_p < 1:
            request["top_p"] = gen.top_p
        if gen.seed is not None:
            request["seed"] = gen.seed
        if gen.stop:
            request["stop"] = list(gen.stop)
        dropped = warn_dropped(self.name, gen, self.preset.extra_params, self._warned)
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

        where = f"{self.name} at {safe_url(self.base_url)}"
        if isinstance(exc, openai.APIConnectionError):  # APITimeoutError is one too
            waited = self.timeout if isinstance(exc, openai.APITimeoutError) else None
            return UnavailableError(no_answer_message(where, self.preset.name, waited))
        if not isinstance(exc, openai.APIError):
            return exc  # a bug or a ValueError of ours: not the provider's fault
        body = exc.body
        text = body.get("message") if isinstance(body, dict) else None
        provider = redact(str(text or exc.message), *self._secrets)
        status = getattr(exc, "status_code", None)
        retry_after = None
        response = getattr(exc, "response", None)
        if response is not None:
            retry_after = retry_after_header(response.headers)
        available = self.available_models() if status == 404 else ()
        return status_error(status, where, provider, retry_after, self.preset.key_env,
                            available=available)
