"""Auth, request ids, body-size cap and one log line per request, as a plain ASGI middleware.

Plain ASGI (not Starlette's BaseHTTPMiddleware), so streaming and disconnect detection pass
through untouched. Logs never hold prompts (unless ``log_prompts``) or keys.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from helpers.config import Settings
from helpers.server.errors import APIError, error_response

logger = logging.getLogger("dhllm.server")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]

MAX_BODY_BYTES = 16 * 2**20  # far above any sane prompt; stops a client from filling memory


class RequestMiddleware:
    """Request ids, the API key check (every route but /health), a body-size cap, one log line."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self._expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:12]
        state: dict[str, Any] = dict(scope.get("state") or {})
        state["request_id"] = request_id
        scope["state"] = state
        path = scope["path"]
        started = time.perf_counter()
        status = [0]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        headers = dict(scope.get("headers") or [])
        try:
            if self._expected and path != "/health" and not secrets.compare_digest(
                headers.get(b"authorization", b""), self._expected
            ):
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               type_="authentication_error")
                response = error_response("/v1" if path.startswith("/v1") else path, err)
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send_wrapper)
                return
            length = headers.get(b"content-length", b"0")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                err = APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", "body")
                await error_response(path, err)(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            if path != "/health" or status[0] >= 400:  # health probes would drown the log
                extra = ""
                if self.settings.log_prompts and "prompt" in state:
                    extra = f" prompt={state['prompt']!r}"
                logger.info(
                    "id=%s route=%s %s status=%s tokens=%s latency=%.3fs%s",
                    request_id, scope.get("method"), path, status[0] or 499,
                    state.get("tokens", 0), time.perf_counter() - started, extra,
                )
