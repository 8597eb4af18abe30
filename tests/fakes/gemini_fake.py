"""A fake Gemini API in Google's REST shape, as google-genai calls it:
``POST /{api_version}/models/{model}:generateContent`` and
``POST /{api_version}/models/{model}:streamGenerateContent?alt=sse``, key in ``x-goog-api-key``.

Like Google it rejects roles other than user/model, answers a wrong key with 400
``API_KEY_INVALID``, an unknown model (``gemini-pro``, the chapter's) with 404, and a 429 with a
``RetryInfo`` detail. Its answer echoes what it received::

    echo: <last user text> (turns=<contents>, system=<system instruction or none>)
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tests.fakes import FakeServer, FakeState, Planned, Received, answer_for, serve

RETIRED_MODELS = ("gemini-pro", "gemini-1.0-pro")  # 404 today

STATUSES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
            429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
MESSAGES = {
    429: "You exceeded your current quota, please check your plan and billing details.",
    500: "An internal error has occurred. Please retry or report in "
         "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
}


def error_response(status: int, message: str | None = None, retry_after: float | None = None,
                   details: list[dict[str, Any]] | None = None) -> JSONResponse:
    """An error in Google's shape: ``{"error": {"code", "message", "status", "details"}}``."""
    error: dict[str, Any] = {"code": status, "message": message or MESSAGES.get(status, "Error"),
                             "status": STATUSES.get(status, "UNKNOWN")}
    details = list(details or [])
    if retry_after is not None:  # Google says how long to wait in a RetryInfo detail
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{retry_after:g}s"})
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status)


def bad_key() -> JSONResponse:
    """What Google answers to a wrong API key."""
    return error_response(400, "API key not valid. Please pass a valid API key.", details=[
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
         "domain": "googleapis.com",
         "metadata": {"service": "generativelanguage.googleapis.com"}}])


def _text(content: Any) -> str:
    return "".join(p.get("text", "") for p in (content or {}).get("parts", []))


def _check(body: Any) -> str | None:
    if not isinstance(body, dict) or not body.get("contents"):
        return "* GenerateContentRequest.contents: contents is not specified"
    for content in body["contents"]:
        if content.get("role") not in ("user", "model"):
            return "Please use a valid role: user, model."
    if body["contents"][-1].get("role") != "user":
        return "Please ensure that the last turn is a user turn."
    return None


def _answer(body: dict[str, Any]) -> tuple[str, str]:
    contents = body["contents"]
    system = _text(body.get("systemInstruction"))
    text = answer_for(_text(contents[-1]), len(contents), system)
    config = body.get("generationConfig") or {}
    for stop in config.get("stopSequences") or []:
        if stop in text:
            text = text[: text.index(stop)]
    words, finish = text.split(" "), "STOP"
    limit = config.get("maxOutputTokens")
    if limit and len(words) > limit:
        text, finish = " ".join(words[:limit]), "MAX_TOKENS"
    return text, finish


def _response(text: str, finish: str | None, model: str) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]},
                                 "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "modelVersion": model,
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": len(text.split()),
                              "totalTokenCount": 1 + len(text.split())}}


def create_gemini_fake(state: FakeState, models: list[str] | None = None) -> FastAPI:
    """The fake's ASGI app, answering from ``state`` (and recording into it).

    ``models``: what ``GET /{version}/models`` lists; given, every other model gets a 404.
    """
    from helpers.chat.presets import GEMINI_MODELS

    enforce = models is not None
    listed = list(models) if models is not None else list(GEMINI_MODELS)
    app = FastAPI(title="fake Gemini API")

    @app.get("/{version}/models")
    def list_models(version: str, request: Request) -> dict[str, Any]:
        with state.lock:  # recorded, but no scripted answer is spent on it
            state.requests.append(Received("GET", request.url.path, {}, {}, None))
        return {"models": [{"name": f"models/{name}", "supportedGenerationMethods":
                            ["generateContent", "countTokens"]} for name in listed]}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/{version}/models/{target}")
    async def generate(version: str, target: str, request: Request) -> Any:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        plan = state.record(Received("POST", request.url.path, dict(request.query_params),
                                     {k.lower(): v for k, v in request.headers.items()}, body))
        model, _, method = target.partition(":")
        if state.api_key is not None and request.headers.get("x-goog-api-key") != state.api_key:
            return bad_key()
        plan = plan or Planned()
        if plan.delay:
            await asyncio.sleep(plan.delay)
        if plan.status != 200:
            return error_response(plan.status, plan.message, plan.retry_after)
        if method not in ("generateContent", "streamGenerateContent"):
            return error_response(404, f"Method {method} not found.")
        if model in RETIRED_MODELS or (enforce and model not in listed):
            return error_response(404, f"models/{model} is not found for API version {version}, "
                                  f"or is not supported for generateContent. Call ListModels to "
                                  f"see the list of available models and their supported methods.")
        problem = _check(body)
        if problem:
            return error_response(400, problem)
        text, finish = _answer(body)
        if method == "generateContent":
            return _response(text, finish, model)

        def events() -> Any:
            words = text.split(" ")
            for i, word in enumerate(words):
                last = i == len(words) - 1
                piece = word if i == 0 else " " + word
                data = _response(piece, finish if last else None, model)
                yield f"data: {json.dumps(data, ensure_ascii=False)}\r\n\r\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def start_fake_gemini(port: int | None = None, api_key: str | None = None,
                      models: list[str] | None = None) -> FakeServer:
    """Start the fake on 127.0.0.1:``port`` (a free one if None); give google-genai ``.base_url``.

    With ``api_key`` set, requests carrying another ``x-goog-api-key`` get Google's 400
    API_KEY_INVALID. With ``models`` set, only those are listed and served (others: 404).
    """
    state = FakeState(api_key=api_key)
    return serve(create_gemini_fake(state, models), state, port, "")
