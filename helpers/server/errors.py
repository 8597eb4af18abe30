"""HTTP errors of both contracts: OpenAI's shape on ``/v1``, ``{"detail", "param", "status"}`` on ``/``.

Backends raise their own errors (``helpers.errors``); here they become statuses by their
``status_code`` and ``param`` attributes, so the server never needs to know which backend failed.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from helpers.server import protocol as p

logger = logging.getLogger("dhllm.server")

_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "overloaded_error"}


class APIError(Exception):
    """An error with an HTTP status, rendered in OpenAI's shape on /v1 and as ``detail`` on /."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or _TYPES.get(status, "invalid_request_error" if status < 500
                                        else "server_error")
        self.retry_after = retry_after

    def detail(self) -> p.ErrorDetail:
        """OpenAI's error body."""
        return p.ErrorDetail(message=self.message, type=self.type, param=self.param,
                             code=self.status)


def error_response(path: str, err: APIError) -> JSONResponse:
    """The JSON response for ``err`` in the shape of the route at ``path``."""
    headers = {"Retry-After": str(max(1, round(err.retry_after)))} if err.retry_after else None
    if path.startswith("/v1"):
        body: dict[str, Any] = p.ErrorResponse(error=err.detail()).model_dump()
    else:
        body = {"detail": err.message, "param": err.param, "status": err.status}
    return JSONResponse(body, status_code=err.status, headers=headers)


def map_exception(exc: BaseException) -> APIError:
    """Backend errors keep their status; ValueError is the client's fault (400); else 500."""
    if isinstance(exc, APIError):
        return exc
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status < 600:
        message = str(exc)
        provider = getattr(exc, "provider_message", None)
        if provider:
            message = f"{message} (provider said: {provider})"
        return APIError(status, message, retry_after=getattr(exc, "retry_after", None))
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), param=getattr(exc, "param", None))
    logger.exception("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}")


def validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's complaints as one 422 naming the fields (400 when the body is not JSON)."""
    errors = exc.errors()
    # The whole body is unusable (not JSON, not an object, empty): 400 as for any bad request.
    if any(e.get("type") == "json_invalid" or tuple(e.get("loc", ())) == ("body",)
           for e in errors):
        return APIError(400, "the request body must be a JSON object (Content-Type: "
                             "application/json)", param="body")
    first = [str(part) for part in (errors[0].get("loc", ()) if errors else ()) if part != "body"]
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body')}: {e.get('msg')}"
             for e in errors]
    return APIError(422, "; ".join(parts), param=".".join(first) or None)


def install_error_handlers(app: FastAPI) -> None:
    """Every error, whatever raised it, leaves in the route's shape (never a bare 500 page)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request.url.path, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request.url.path, map_exception(exc))
