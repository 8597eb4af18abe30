"""A fake OpenAI-compatible provider: ``POST /v1/chat/completions`` (JSON and SSE) and
``GET /v1/models``, with OpenAI's error bodies. Given ``models``, it lists only those and answers
any other model with OpenAI's 404 ``model_not_found`` (a retired default, for instance). Its answer echoes what it received::

    echo: <last user message> (turns=<user+assistant messages>, system=<system prompt or none>)

``max_tokens`` cuts the answer to that many words (finish_reason "length") and ``stop`` cuts it
at the first stop string, so parameter mapping is visible in the answer too.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tests.fakes import FakeServer, FakeState, Planned, Received, answer_for, serve

ERRORS: dict[int, tuple[str, str | None, str]] = {  # status -> (type, code, message)
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided: {masked}. "
          "You can find your API key at https://platform.openai.com/account/api-keys."),
    404: ("invalid_request_error", "model_not_found",
          "The model `{model}` does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for {model} on requests per "
          "min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s."),
    500: ("server_error", None, "The server had an error while processing your request. "
          "Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later"),
}


def _mask(key: str) -> str:
    """How OpenAI shows a wrong key in its 401 message (first 3 and last 4 characters)."""
    return key[:3] + "*" * max(len(key) - 7, 3) + key[-4:] if len(key) > 7 else "***"


def error_response(status: int, message: str | None = None, retry_after: float | None = None,
                   **fill: str) -> JSONResponse:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind, code, template = ERRORS.get(status, ("api_error", None, f"HTTP {status}"))
    body = {"error": {"message": message or template.format_map(fill), "type": kind,
                      "param": None, "code": code}}
    headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


def _answer(body: dict[str, Any]) -> tuple[str, str]:
    messages = body["messages"]
    system = " ".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    turns = [m for m in messages if m["role"] in ("user", "assistant")]
    last_user = next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")
    text = answer_for(last_user, len(turns), system)
    finish = "stop"
    stops = body.get("stop") or []
    for stop in [stops] if isinstance(stops, str) else stops:
        if stop in text:
            text = text[: text.index(stop)]
    words = text.split(" ")
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    if limit and len(words) > limit:
        text, finish = " ".join(words[:limit]), "length"
    return text, finish


def _check(body: Any) -> str | None:
    """Why OpenAI would reject this body with 400, or None."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return "'messages' is a required property and must be a non-empty array"
    for i, m in enumerate(body["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            return f"Invalid value for 'messages[{i}].role'"
    if "max_tokens" in body and not (isinstance(body["max_tokens"], int) and body["max_tokens"] > 0):
        return "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1."
    temperature = body.get("temperature", 1)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        return "Invalid 'temperature': expected a number between 0 and 2."
    return None


def default_models() -> list[str]:
    """Every preset's first choice: the notebooks' defaults all answer under test."""
    from helpers.chat.presets import PRESETS

    return sorted({p.default_model for p in PRESETS.values()})


def create_openai_fake(state: FakeState, models: list[str] | None = None) -> FastAPI:
    """The fake's ASGI app, answering from ``state`` (and recording into it).

    ``models``: what ``/v1/models`` lists; given, every other model gets a 404.
    """
    enforce = models is not None  # before the route below shadows the name
    listed = list(models) if models is not None else default_models()
    app = FastAPI(title="fake OpenAI-compatible API")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        with state.lock:  # recorded, but no scripted answer is spent on it
            state.requests.append(Received("GET", request.url.path, {}, {}, None))
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "fake"} for name in listed]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Any:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        plan = state.record(Received("POST", request.url.path, dict(request.query_params),
                                     {k.lower(): v for k, v in request.headers.items()}, body))
        model = body.get("model", "") if isinstance(body, dict) else ""
        sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if state.api_key is not None and sent != state.api_key:
            return error_response(401, masked=_mask(sent))
        plan = plan or Planned()
        if plan.delay:
            await asyncio.sleep(plan.delay)
        if plan.status != 200:
            return error_response(plan.status, plan.message, plan.retry_after, model=model,
                                  masked=_mask(sent))
        if enforce and model not in listed:
            return error_response(404, model=model)
        problem = _check(body)
        if problem:
            return error_response(400, problem)
        text, finish = _answer(body)
        created, cid = int(time.time()), f"chatcmpl-fake{len(state.requests)}"
        if not body.get("stream"):
            return {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split()),
                          "total_tokens": 1 + len(text.split())},
            }

        def chunk(delta: dict[str, str], finish_reason: str | None) -> str:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [{"index": 0, "delta": delta,
                                                 "finish_reason": finish_reason}]}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def events() -> Any:
            yield chunk({"role": "assistant", "content": ""}, None)
            words = text.split(" ")
            for i, word in enumerate(words):
                yield chunk({"content": word if i == 0 else " " + word}, None)
            yield chunk({}, finish)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def start_fake_openai(port: int | None = None, api_key: str | None = None,
                      models: list[str] | None = None) -> FakeServer:
    """Start the fake on 127.0.0.1:``port`` (a free one if None); ``.base_url`` ends in /v1.

    With ``api_key`` set, requests carrying another key get OpenAI's 401. With ``models`` set,
    only those are listed and served (others: 404).
    """
    state = FakeState(api_key=api_key)
    return serve(create_openai_fake(state, models), state, port, "/v1")
