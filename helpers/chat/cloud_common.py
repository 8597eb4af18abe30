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
# Model names retire: the default is a preference list, checked against the provider's list.

MAX_LISTED = 15  # models named in a message; a provider may list a hundred


def pick_model(preferences: Sequence[str], available: Sequence[str]) -> str | None:
    """The first of ``preferences`` the provider lists, or None."""
    listed = set(available)
    return next((name for name in preferences if name in listed), None)


def models_hint(available: Sequence[str]) -> str:
    """`` This key can use: a, b, c (and N more).`` for an error message; empty if unknown."""
    if not available:
        return ""
    names = sorted(available)
    more = f" (and {len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return f" This key can use: {', '.join(names[:MAX_LISTED])}{more}."


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
    """Map an HTTP status to our exception classes; a 404 names the ``available`` models."""
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
        hint = f" (is the model name right?){models_hint(available)}" if status == 404 else ""
        return BadRequestError(f"{said}{hint}", provider_message=provider)
    return ChatModelError(said, provider_message=provider)


