"""What the cloud backends share: timeouts, retry waits, and mapping HTTP statuses to our errors."""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

from helpers.chat.base import GenerationParams
from helpers.config import get_settings
from helpers.errors import (
    AuthenticationError,
    BadRequestError,
    ChatModelError,
    RateLimitError,
    UnavailableError,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 3
# Neither lists mainland China among its supported regions (OpenAI:
# https://help.openai.com/en/articles/5347006, Gemini:
# https://ai.google.dev/gemini-api/docs/available-regions); these three are hosted there.
BLOCKED_IN_CHINA = ("openai", "gemini")
REACHABLE_FROM_CHINA = ("deepseek", "zhipu", "dashscope")
LOCAL_PRESETS = ("vllm", "ollama", "dhllm")


def cloud_timeouts(timeout: float | None) -> tuple[float, float]:
    """``(per request, connect)`` in seconds: ``timeout`` or DHLLM_CLOUD_TIMEOUT, and the connect
    part (DHLLM_CLOUD_CONNECT_TIMEOUT) never longer than the whole."""
    settings = get_settings()
    total = settings.cloud_timeout if timeout is None else timeout
    return total, min(total, settings.cloud_connect_timeout)


def no_answer_message(where: str, provider: str, seconds: float | None) -> str:
    """What a learner reads when a provider does not answer within ``seconds`` (None: the
    connection failed at once), in Chinese with the fix, English after it."""
    if seconds is None:
        zh, en = "连不上", "cannot connect"
    else:
        zh, en = f"{seconds:g} 秒内没有回答（超时）", f"no answer within {seconds:g} s (timeout)"
    if provider in BLOCKED_IN_CHINA:
        fix = ("在中国大陆不开 VPN 时连不上 OpenAI 和 Gemini。解决办法：改用在国内可以直接访问的"
               "服务商，例如 get_chat_model(\"deepseek\")、\"zhipu\" 或 \"dashscope\"；或者在启动 "
               "Jupyter 之前设置代理：export HTTPS_PROXY=http://127.0.0.1:<代理端口>")
    elif provider in LOCAL_PRESETS:
        fix = "本机的服务在运行吗？base_url 对吗？"
    else:
        fix = "检查网络、代理（HTTPS_PROXY）和 base_url；回答很长时可以把超时调大：DHLLM_CLOUD_TIMEOUT=120"
    return f"{where}：{zh}。{fix} / {en}"
MAX_RETRY_AFTER = 60.0  # a longer server-requested wait is not worth blocking a chat for


def safe_url(url: str | None) -> str | None:
    """A URL without user:password@ (never shown)."""
    return re.sub(r"//[^/@]*@", "//", url) if url else url


def warn_dropped(provider: str, gen: GenerationParams, supported: Sequence[str],
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
# Model names retire: the default is a preference list, checked against the provider's list.

MAX_LISTED = 15  # models named in a message; a provider may list a hundred


def pick_model(preferences: Sequence[str], available: Sequence[str]) -> str | None:
    """The first of ``preferences`` the provider lists, or None."""
    listed = set(available)
    return next((name for name in preferences if name in listed), None)


def models_hint(available: Sequence[str]) -> str:
    """`` 这个密钥能用：a, b, c（还有 N 个）。`` for an error message; empty if unknown."""
    if not available:
        return ""
    names = sorted(available)
    more = f"（还有 {len(names) - MAX_LISTED} 个）" if len(names) > MAX_LISTED else ""
    return f" 这个密钥能用：{', '.join(names[:MAX_LISTED])}{more}。"


def retry_after_header(headers: Any) -> float | None:
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


def status_error(status: int | None, where: str, provider: str, retry_after: float | None,
                  key_env: str | None, bad_key: bool = False,
                  available: Sequence[str] = ()) -> ChatModelError:
    """Map an HTTP status to our exception classes; a 404 names the ``available`` models.

    The message: what it means in Chinese, then the provider's own words (``said``)."""
    said = f"{where} answered {status}: {provider.rstrip('.')}"
    if status in (401, 403) or bad_key:
        key = f" Check {key_env}." if key_env else ""
        zh = f"API 密钥被拒绝（{status}），请检查 {key_env}" if key_env else f"被拒绝（{status}）"
        return AuthenticationError(f"{zh}。 / {said}.{key}", provider_message=provider)
    if status == 429:
        return RateLimitError(f"请求太多或额度用完了（429），重试次数已用完，请稍后再试。 / {said} "
                              f"(rate limit or quota; retries ran out)",
                              provider_message=provider, retry_after=retry_after)
    if status is not None and (status >= 500 or status == 408):
        return UnavailableError(f"服务商暂时出错（{status}），重试次数已用完，请稍后再试。 / {said} "
                                f"(retries ran out)", provider_message=provider,
                                retry_after=retry_after)
    if status is not None and 400 <= status < 500:
        if status == 404:
            zh = f"找不到（404）：模型名对吗？{models_hint(available)}"
            return BadRequestError(f"{zh} / {said} (is the model name right?)",
                                   provider_message=provider)
        return BadRequestError(f"请求被拒绝（{status}）。 / {said}", provider_message=provider)
    return ChatModelError(f"服务商出错。 / {said}", provider_message=provider)




def network_failure(exc: BaseException) -> str | None:
    """``"timeout"``, ``"connect"`` or None: what kind of transport failure an SDK raised (the
    openai SDK's own classes, or httpx's / httpx2's under google-genai)."""
    with contextlib.suppress(ImportError):
        import openai

        if isinstance(exc, openai.APITimeoutError):
            return "timeout"
        if isinstance(exc, openai.APIConnectionError):
            return "connect"
    for module in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError, AttributeError):
            httpx = importlib.import_module(module)
            if isinstance(exc, httpx.TimeoutException):
                return "timeout"
            if isinstance(exc, httpx.TransportError):
                return "connect"
    return None


@contextlib.contextmanager
def explained(provider: str, timeout: float) -> Iterator[None]:
    """Around a notebook's own SDK calls: a timeout or a failed connection becomes an
    UnavailableError whose message (Chinese, with the fix) says what to do; the rest passes."""
    try:
        yield
    except Exception as exc:
        kind = network_failure(exc)
        if kind is None:
            raise
        waited = timeout if kind == "timeout" else None
        raise UnavailableError(no_answer_message(provider, provider, waited)) from None
