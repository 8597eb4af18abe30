"""Errors any chat backend may raise. Imports nothing from the package, so every layer can use it.

The server maps them to HTTP statuses by ``status_code`` without knowing the backends.
"""

from __future__ import annotations


class InvalidParamError(ValueError):
    """A bad message or parameter from the caller; ``param`` names the field to fix."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class ChatModelError(RuntimeError):
    """A backend failed; ``provider_message`` keeps what the provider said (never a key)."""

    status_code = 502

    def __init__(self, message: str, provider_message: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.provider_message = provider_message
        self.retry_after = retry_after


class AuthenticationError(ChatModelError):
    """The provider rejected the API key (or none was given)."""

    status_code = 502  # our server is fine; its upstream credentials are not


class RateLimitError(ChatModelError):
    """The provider said 429 and retries ran out."""

    status_code = 429


class BadRequestError(ChatModelError, ValueError):
    """The provider rejected the request itself (4xx other than auth/rate limit)."""

    status_code = 400


class UnavailableError(ChatModelError):
    """The provider timed out or answered 5xx after retries."""

    status_code = 503

