"""What the cloud backends share: timeouts, retry waits, and mapping HTTP statuses to our errors."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from helpers.chat.base import GenerationParams
from helpers.errors import (
    AuthenticationError,
    BadRequestError,
    ChatModelError,
    RateLimitError,
    UnavailableError,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds, for each HTTP request
DEFAULT_MAX_RETRIES = 3
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


