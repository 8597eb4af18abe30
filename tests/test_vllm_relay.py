"""The vLLM relay when an upstream replica fails, against a scripted OpenAI-compatible upstream.

A request that no client has seen any of is sent again (behind a router: to another replica);
a stream that had started ends with an error event and ``[DONE]``; an upstream stream that
stops before ``[DONE]`` is an error, never a short answer. Real HTTP on 127.0.0.1 both sides;
no vLLM needed (``test_vllm_replicas.py`` kills a real replica).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from helpers.background_server import ServerHandle, free_port, start_uvicorn
from helpers.chat import get_chat_model
from helpers.config import get_settings
from helpers.server import create_app, serve_in_background
from helpers.server.vllm.relay import VLLMEngine

WORDS = ["The", " capital", " of", " France", " is", " Paris", "."]
ANSWER = "".join(WORDS)


class FlakyReplica:
    """An upstream whose next answers are scripted: "ok", "cut" (dies after 3 pieces),
    "short" (ends cleanly, but before ``[DONE]``) or "503"."""

    def __init__(self) -> None:
        self.plan: deque[str] = deque()
        self.seen = 0
        self.lock = threading.Lock()
        app = FastAPI()
        app.get("/health")(lambda: {"ok": True})
        app.post("/v1/chat/completions")(self.complete)
        self.handle = start_uvicorn(app, port=free_port())
        self.base_url = self.handle.url + "/v1"

    async def complete(self, request: Request) -> Any:
        await request.json()
        with self.lock:
            self.seen += 1
            how = self.plan.popleft() if self.plan else "ok"
        if how == "503":
            return JSONResponse({"error": {"message": "no healthy worker"}}, status_code=503)
        return StreamingResponse(self.events(how), media_type="text/event-stream")

    @staticmethod
    def events(how: str) -> Iterator[str]:
        def chunk(choice: dict[str, Any], usage: dict[str, int] | None = None) -> str:
            return "data: " + json.dumps({"choices": [choice] if choice else [],
                                          "usage": usage}) + "\n\n"

        for i, word in enumerate(WORDS):
            if how in ("cut", "short") and i == 3:
                if how == "cut":  # the replica died: the connection breaks mid-body
                    raise ConnectionAbortedError("replica killed")
                return
            yield chunk({"index": 0, "delta": {"content": word}, "finish_reason": None})
        yield chunk({"index": 0, "delta": {}, "finish_reason": "stop"})
        yield chunk({}, {"prompt_tokens": 9, "completion_tokens": len(WORDS)})
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
    handle, engine = gateway(upstream, retries=2)
    with handle:
        yield handle, engine


def ask(url: str, stream: bool = False) -> requests.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}],
            "max_tokens": 16, "stream": stream}
    return requests.post(url + "/v1/chat/completions", json=body, stream=stream, timeout=30)


@pytest.mark.parametrize("failure", ["cut", "short", "503"])
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


@pytest.mark.parametrize("failure", ["cut", "short"])
def test_a_started_stream_ends_with_an_error_event(behind_router: tuple[ServerHandle, VLLMEngine],
                                                   upstream: FlakyReplica, failure: str) -> None:
    handle, engine = behind_router
    upstream.plan.extend([failure])
    before = upstream.seen
    with ask(handle.url, stream=True) as reply:
        events = [line for line in reply.iter_lines(decode_unicode=True) if line]
    errors = [json.loads(e[5:])["error"] for e in events if e.startswith('data: {"error"')]
    assert errors and errors[0]["type"] and "stopped in the middle" in errors[0]["message"]
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
