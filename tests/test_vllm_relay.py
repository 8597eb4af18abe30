"""The vLLM relay when an upstream replica fails, against a scripted OpenAI-compatible upstream.

A request that no client has seen any of is sent again (behind a router: to another replica);
a stream that had started ends with an error event and ``[DONE]``; an upstream stream that
stops before ``[DONE]`` is an error, never a short answer. Real HTTP on 127.0.0.1 both sides;
no vLLM needed (``test_vllm_replicas.py`` kills a real replica).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from helpers.background_server import ServerHandle, free_port, start_uvicorn
from helpers.chat import GenerationParams, get_chat_model
from helpers.config import get_settings
from helpers.server import create_app, serve_in_background
from helpers.server.errors import map_exception
from helpers.server.vllm.relay import VLLMEngine

WORDS = ["The", " capital", " of", " France", " is", " Paris", "."]
ANSWER = "".join(WORDS)


PROMPT_IDS = [900, 901]  # the token ids the scripted upstream says the prompt has


class FlakyReplica:
    """An upstream whose next answers are scripted: "ok", "cut" (dies after 3 pieces),
    "short" (ends cleanly, but before ``[DONE]``), "error" (vLLM's error event after 3 pieces,
    then ``[DONE]``), "abort" (``finish_reason: "abort"`` after 3 pieces), "stall" (3 pieces,
    then nothing) or "503". Asked for ``return_token_ids`` it gives word i the id i, as vLLM
    does; ``/v1/completions`` with a token-id prompt goes on from the ids after the prompt's."""

    def __init__(self) -> None:
        self.plan: deque[str] = deque()
        self.seen = 0
        self.lock = threading.Lock()
        app = FastAPI()
        app.get("/health")(lambda: {"ok": True})
        app.post("/v1/chat/completions")(self.complete)
        app.post("/v1/completions")(self.complete)
        self.bodies: list[dict[str, Any]] = []
        self.give_ids = True  # False: an upstream without return_token_ids
        self.handle = start_uvicorn(app, port=free_port())
        self.base_url = self.handle.url + "/v1"

    async def complete(self, request: Request) -> Any:
        body = await request.json()
        with self.lock:
            self.seen += 1
            self.bodies.append(body)
            how = self.plan.popleft() if self.plan else "ok"
        if how == "503":
            return JSONResponse({"error": {"message": "no healthy worker"}}, status_code=503)
        ids = self.give_ids and bool(body.get("return_token_ids"))
        return StreamingResponse(self.events(how, body, ids), media_type="text/event-stream")

    @staticmethod
    async def events(how: str, body: dict[str, Any], ids: bool) -> AsyncIterator[str]:
        prompt = body.get("prompt")
        first = len(prompt) - len(PROMPT_IDS) if isinstance(prompt, list) else 0
        text_key = "text" if "prompt" in body else "delta"

        def chunk(choice: dict[str, Any], usage: dict[str, int] | None = None,
                  **extra: Any) -> str:
            return "data: " + json.dumps({"choices": [choice] if choice else [],
                                          "usage": usage, **extra}) + "\n\n"

        def piece(i: int, word: str) -> dict[str, Any]:
            content = word if text_key == "text" else {"content": word}
            return {"index": 0, text_key: content, "finish_reason": None,
                    **({"token_ids": [i]} if ids else {})}

        if ids:
            yield chunk({}, prompt_token_ids=prompt if isinstance(prompt, list) else PROMPT_IDS)
        for i, word in enumerate(WORDS[first:], first):
            if i == 3 and how != "ok":
                if how == "cut":  # the replica died: the connection breaks mid-body
                    raise ConnectionAbortedError("replica killed")
                if how == "error":  # what vLLM's serving_chat sends when generation fails
                    yield "data: " + json.dumps({"error": {
                        "message": "EngineCore encountered an issue", "type": "InternalServerError",
                        "code": 500}}) + "\n\n"
                    yield "data: [DONE]\n\n"
                if how == "abort":
                    yield chunk({"index": 0, text_key: {} if text_key == "delta" else "",
                                 "finish_reason": "abort"})
                    yield "data: [DONE]\n\n"
                if how == "stall":
                    await asyncio.sleep(60)
                return
            yield chunk(piece(i, word))
        yield chunk({"index": 0, text_key: {} if text_key == "delta" else "",
                     "finish_reason": "stop"})
        yield chunk({}, {"prompt_tokens": 9, "completion_tokens": len(WORDS) - first})
        yield "data: [DONE]\n\n"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FlakyReplica]:
    replica = FlakyReplica()
    yield replica
    replica.handle.stop()


def gateway(upstream: FlakyReplica, retries: int) -> tuple[ServerHandle, VLLMEngine]:
    chat_model = get_chat_model("vllm:m", base_url=upstream.base_url)
    engine = VLLMEngine(chat_model, upstream.base_url, "m", retries=retries)
    app = create_app(chat_model, get_settings(api_key=None), engine=engine)
    return serve_in_background(app, port=free_port()), engine


@pytest.fixture
def behind_router(upstream: FlakyReplica) -> Iterator[tuple[ServerHandle, VLLMEngine]]:
    upstream.plan.clear()
    upstream.give_ids = True
    handle, engine = gateway(upstream, retries=2)
    with handle:
        yield handle, engine


def ask(url: str, stream: bool = False) -> requests.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}],
            "max_tokens": 16, "stream": stream}
    return requests.post(url + "/v1/chat/completions", json=body, stream=stream, timeout=30)


@pytest.mark.parametrize("failure", ["cut", "short", "503", "error", "abort"])
def test_a_non_streamed_reply_is_retried_whole(behind_router: tuple[ServerHandle, VLLMEngine],
                                               upstream: FlakyReplica, failure: str) -> None:
    handle, engine = behind_router
    upstream.plan.extend([failure])
    before = upstream.seen
    reply = ask(handle.url)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == ANSWER  # no half-answer glued on
    assert upstream.seen - before == 2 and engine.retried == 1
    # The chapter's POST / collects the whole reply too.
    upstream.plan.extend([failure])
    chapter = requests.post(handle.url, json={"prompt": "Capital of France?"}, timeout=30)
    assert chapter.status_code == 200 and chapter.json()["response"] == ANSWER


def test_retries_end_with_a_503_that_says_why(behind_router: tuple[ServerHandle, VLLMEngine],
                                              upstream: FlakyReplica) -> None:
    handle, _ = behind_router
    upstream.plan.extend(["cut", "cut", "cut"])
    reply = ask(handle.url)
    assert reply.status_code == 503
    assert "stopped in the middle of the answer" in reply.json()["error"]["message"]


def test_a_stream_is_retried_only_before_its_first_piece(
        behind_router: tuple[ServerHandle, VLLMEngine], upstream: FlakyReplica) -> None:
    handle, _ = behind_router
    upstream.plan.extend(["503"])
    with ask(handle.url, stream=True) as reply:
        events = [line for line in reply.iter_lines(decode_unicode=True) if line]
    pieces = [json.loads(e[5:])["choices"][0]["delta"].get("content", "") for e in events
              if e.startswith("data: {") and '"choices"' in e]
    assert "".join(pieces) == ANSWER and events[-1] == "data: [DONE]"


def stream_events(url: str) -> tuple[str, list[str]]:
    """The streamed answer's text and its events."""
    with ask(url, stream=True) as reply:
        events = [line for line in reply.iter_lines(decode_unicode=True) if line]
    pieces = [json.loads(e[5:])["choices"][0]["delta"].get("content", "") for e in events
              if e.startswith("data: {") and '"choices"' in e and json.loads(e[5:])["choices"]]
    return "".join(pieces), events


@pytest.mark.parametrize("failure", ["cut", "short", "error", "abort"])
def test_a_started_stream_is_continued_on_another_replica(
        behind_router: tuple[ServerHandle, VLLMEngine], upstream: FlakyReplica,
        failure: str) -> None:
    handle, engine = behind_router
    upstream.plan.extend([failure])
    before = len(upstream.bodies)
    text, events = stream_events(handle.url)
    assert text == ANSWER and not any('"error"' in e for e in events), events
    assert events[-1] == "data: [DONE]" and engine.continued == 1
    first, second = upstream.bodies[before:]
    assert "messages" in first and first["return_token_ids"] is True
    # The prompt's ids and the three delivered ones, for the tokens still allowed.
    assert second["prompt"] == [*PROMPT_IDS, 0, 1, 2] and second["max_tokens"] == 16 - 3
    assert engine.stats.errors == 0 and engine.stats.completed == 1


@pytest.mark.parametrize("failure", ["cut", "short", "error", "abort"])
def test_a_started_stream_ends_with_an_error_event(behind_router: tuple[ServerHandle, VLLMEngine],
                                                   upstream: FlakyReplica, failure: str) -> None:
    handle, engine = behind_router
    upstream.give_ids = False  # no token ids to go on from: the text cannot be taken back
    upstream.plan.extend([failure])
    before = upstream.seen
    with ask(handle.url, stream=True) as reply:
        events = [line for line in reply.iter_lines(decode_unicode=True) if line]
    errors = [json.loads(e[5:])["error"] for e in events if e.startswith('data: {"error"')]
    assert errors and errors[0]["type"] and "in the middle" in errors[0]["message"]
    assert events[-1] == "data: [DONE]"
    assert upstream.seen - before == 1 and engine.retried == 0  # its text cannot be taken back
    assert engine.stats.errors == 1


def test_one_vllm_without_a_router_is_not_retried(upstream: FlakyReplica) -> None:
    upstream.plan.clear()
    upstream.plan.extend(["cut"])
    before = upstream.seen
    handle, engine = gateway(upstream, retries=0)
    with handle:
        assert ask(handle.url).status_code == 503
    assert upstream.seen - before == 1 and engine.retried == 0


@pytest.mark.parametrize("failure", ["error", "abort"])
def test_a_vllm_error_mid_answer_is_a_5xx_with_the_reason(upstream: FlakyReplica,
                                                          failure: str) -> None:
    upstream.plan.clear()
    handle, _ = gateway(upstream, retries=0)
    with handle:
        upstream.plan.extend([failure])
        reply = ask(handle.url)
        assert reply.status_code == 503, reply.text
        assert "failed in the middle of the answer" in reply.json()["error"]["message"]
        upstream.plan.extend([failure])
        chapter = requests.post(handle.url, json={"prompt": "Capital of France?"}, timeout=30)
        assert chapter.status_code == 503 and "in the middle" in chapter.json()["detail"]
        upstream.plan.extend([failure])
        text, events = stream_events(handle.url)
        assert text == "".join(WORDS[:3]) and '"error"' in events[-2]
        if failure == "error":  # vLLM's own reason reaches the client
            assert "EngineCore encountered an issue" in events[-2]


def test_a_server_that_stops_mid_request_answers_503(upstream: FlakyReplica) -> None:
    upstream.plan.clear()
    upstream.plan.extend(["stall"])
    chat_model = get_chat_model("vllm:m", base_url=upstream.base_url)
    engine = VLLMEngine(chat_model, upstream.base_url, "m")

    async def stop_while_it_runs() -> BaseException | str:
        engine.start()
        stream = engine.submit([{"role": "user", "content": "hi"}], GenerationParams())
        stream.buffered = True
        await asyncio.sleep(1.0)  # the upstream has sent its 3 pieces and stalls
        engine.stop()
        try:
            return await stream.text()
        except Exception as exc:  # noqa: BLE001 - what the route would map
            return exc

    outcome = asyncio.run(stop_while_it_runs())
    assert isinstance(outcome, BaseException), f"an answer of {outcome!r}, not an error"
    error = map_exception(outcome)
    assert error.status == 503 and "stopping" in error.message


def test_a_stream_cut_then_refused_gets_every_token_it_may_still_have(
        behind_router: tuple[ServerHandle, VLLMEngine], upstream: FlakyReplica) -> None:
    """Cut after 3 tokens, then a 503 while the router has no healthy replica (a router
    restarting): the next continuation may still have 16 - 3 tokens, not 16 - 3 - 3 (4 of 8
    streams ended short of their length when the router was killed, fault bench 2026-12-07)."""
    handle, engine = behind_router
    upstream.plan.extend(["cut", "503"])
    before = len(upstream.bodies)
    text, events = stream_events(handle.url)
    assert text == ANSWER and events[-1] == "data: [DONE]", events
    _, refused, last = upstream.bodies[before:]
    assert refused["max_tokens"] == last["max_tokens"] == 16 - 3
    assert last["prompt"] == [*PROMPT_IDS, 0, 1, 2]
