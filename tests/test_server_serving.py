"""Serving behaviour: health under load, disconnects, the bounded queue, errors, auth and logs,
independent apps, ports."""

from __future__ import annotations

import gc
import json
import logging
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from helpers.chat import ChatModel, RateLimitError, TransformersChat, UnavailableError
from helpers.client import LinlyClient, ServerError
from helpers.server import PortInUseError, ServerHandle, create_app, serve_in_background
from tests.conftest import free_port

LONG = 1500  # more tokens than any test waits for: these requests end only when cancelled


def serve(model: ChatModel, **settings: Any) -> ServerHandle:
    return serve_in_background(model, host="127.0.0.1", port=free_port(), **settings)


@pytest.fixture(scope="module")
def server(tiny_chat: TransformersChat) -> Iterator[ServerHandle]:
    with serve(tiny_chat, default_max_new_tokens=16) as handle:
        yield handle


def stats(handle: ServerHandle) -> dict[str, int]:
    return requests.get(handle.url + "/health", timeout=10).json()["stats"]


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    """Poll until ``predicate()``; fail with ``what`` after ``timeout`` (a bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def open_stream(handle: ServerHandle, max_tokens: int = LONG) -> requests.Response:
    response = requests.post(handle.url + "/v1/chat/completions", stream=True, timeout=30, json={
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens, "temperature": 0.8, "stream": True})
    response.raise_for_status()
    return response


def content_chunks(response: requests.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith(b"data: {"):
            delta = json.loads(line[6:])["choices"]
            if delta and delta[0]["delta"].get("content"):
                yield delta[0]["delta"]["content"]


def test_first_tokens_arrive_before_the_end_and_disconnect_cancels(server):
    before = stats(server)
    response = open_stream(server)
    chunks = content_chunks(response)
    first = [next(chunks) for _ in range(3)]
    assert all(first)
    assert stats(server)["running"] == 1  # still generating: the first tokens came early
    response.close()  # the client hangs up mid-stream
    wait_for(lambda: stats(server)["cancelled"] == before["cancelled"] + 1, "the cancellation")
    after = stats(server)
    assert after["running"] == 0
    assert after["completion_tokens"] - before["completion_tokens"] < LONG


def test_health_answers_while_eight_generate(server):
    before = stats(server)
    responses = [open_stream(server) for _ in range(8)]
    # Keep the iterators: a dropped one is garbage-collected, which closes its connection.
    readers = [content_chunks(response) for response in responses]
    for reader in readers:
        next(reader)
    wait_for(lambda: stats(server)["running"] == 8, "eight running rows")
    latencies = []
    for _ in range(20):
        started = time.perf_counter()
        reply = requests.get(server.url + "/health", timeout=10)
        latencies.append(time.perf_counter() - started)
        assert reply.status_code == 200
    assert reply.json()["stats"]["running"] == 8  # answered while all eight were generating
    print(f"/health while 8 generate: max {max(latencies) * 1000:.1f} ms")
    for response in responses:
        response.close()
    wait_for(lambda: stats(server)["cancelled"] == before["cancelled"] + 8, "eight cancellations")
    assert stats(server)["max_batch_seen"] >= 8


def test_full_queue_answers_503_with_retry_after(tiny_chat):
    with serve(tiny_chat, max_batch_size=1, max_queue=1) as handle:
        running = open_stream(handle)
        reader = content_chunks(running)
        next(reader)
        waiting: list[requests.Response] = []
        thread = threading.Thread(target=lambda: waiting.append(open_stream(handle)))
        thread.start()
        wait_for(lambda: stats(handle)["waiting"] == 1, "a waiting request")
        for path, body in [("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "x"}]}),
                           ("/", {"prompt": "x"})]:
            full = requests.post(handle.url + path, json=body, timeout=10)
            assert full.status_code == 503, full.text
            assert int(full.headers["Retry-After"]) >= 1
        assert json.loads(full.text)["detail"]
        running.close()
        thread.join(30)
        waiting[0].close()


class FailingChat(ChatModel):
    """A backend whose provider fails in a given way."""

    name = "failing"

    def __init__(self, exc: BaseException, after_pieces: int = 0) -> None:
        self.exc = exc
        self.after = after_pieces

    def stream(self, messages, **params):
        for _ in range(self.after):
            yield "piece "
        raise self.exc


@pytest.mark.parametrize(("exc", "status"), [
    (RateLimitError("slow down", retry_after=7), 429),
    (UnavailableError("provider down"), 503),
    (ValueError("temperature unsupported by this provider"), 400),
])
def test_backend_errors_map_to_their_status(exc, status):
    with serve(FailingChat(exc)) as handle:
        v1 = requests.post(handle.url + "/v1/chat/completions", timeout=10,
                           json={"messages": [{"role": "user", "content": "x"}]})
        chapter = requests.post(handle.url, json={"prompt": "x"}, timeout=10)
    assert v1.status_code == chapter.status_code == status
    assert str(exc) in v1.json()["error"]["message"]
    if status == 429:
        assert v1.headers["Retry-After"] == "7"


def test_error_mid_stream_reaches_the_client():
    with serve(FailingChat(UnavailableError("lost the provider"), after_pieces=2)) as handle:
        client = LinlyClient(handle.url)
        pieces: list[str] = []
        with pytest.raises(ServerError, match="lost the provider"):
            pieces.extend(client.stream("x"))
    assert pieces == ["piece ", "piece "]


def test_api_key_guards_every_route_but_health_and_never_reaches_the_log(tiny_chat, caplog):
    key = "sk-test-Very-Secret-42"
    caplog.set_level(logging.INFO, logger="dhllm.server")
    with serve(tiny_chat, api_key=key, default_max_new_tokens=4) as handle:
        assert requests.get(handle.url + "/health", timeout=10).status_code == 200
        for method, path in [("post", "/v1/chat/completions"), ("get", "/v1/models"),
                             ("post", "/"), ("get", "/openapi.json"), ("get", "/docs")]:
            response = requests.request(method, handle.url + path, json={"prompt": "x"},
                                        headers={"Authorization": "Bearer wrong"}, timeout=10)
            assert response.status_code == 401, path
        assert requests.get(handle.url + "/v1/models", timeout=10).json()["error"]["type"] == (
            "authentication_error")
        good = LinlyClient(handle.url, api_key=key)
        answer, history = good.chat("secret question", max_length=3)
        assert history == [["secret question", answer]]
        assert "".join(good.stream("hi", max_tokens=3))
        with pytest.raises(ServerError) as info:
            LinlyClient(handle.url, api_key="nope").chat("x")
        assert info.value.status == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "dhllm.server"]
    assert any("route=POST /" in line and "status=200" in line and "tokens=" in line
               and "latency=" in line and "id=" in line for line in lines)
    assert any("status=401" in line for line in lines)
    assert key not in caplog.text and "secret question" not in caplog.text


def test_prompts_logged_only_when_asked(tiny_chat, caplog):
    caplog.set_level(logging.INFO, logger="dhllm.server")
    with serve(tiny_chat, log_prompts=True, default_max_new_tokens=2) as handle:
        requests.post(handle.url, json={"prompt": "log me please"}, timeout=30)
    assert "log me please" in caplog.text


def test_two_apps_in_one_process_share_nothing(tiny_chat):
    app_a, app_b = create_app(tiny_chat), create_app(tiny_chat)
    assert app_a.state.engine is not app_b.state.engine
    with serve(tiny_chat, api_key="key-a") as a, serve(tiny_chat) as b:
        requests.post(b.url, json={"prompt": "x", "max_length": 2}, timeout=30).raise_for_status()
        assert stats(b)["completed"] == 1
        assert requests.get(a.url + "/health", timeout=10).json()["stats"]["completed"] == 0
        assert requests.post(a.url, json={"prompt": "x"}, timeout=10).status_code == 401
        assert requests.post(b.url, json={"prompt": "x", "max_length": 2},
                             timeout=30).status_code == 200


def test_busy_port_fails_at_once_and_stop_frees_the_port(tiny_chat):
    port = free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        with pytest.raises(PortInUseError, match=str(port)):
            serve_in_background(tiny_chat, port=port)
    handle = serve_in_background(tiny_chat, port=port)
    assert handle.running and handle.url == f"http://127.0.0.1:{port}"
    handle.stop()
    assert not handle.running
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # free right after stop()


def test_serve_in_background_takes_a_ready_app(tiny_chat):
    app = create_app(tiny_chat)
    with serve_in_background(app, port=free_port()) as handle:
        assert LinlyClient(handle.url).health()["engine"] == "continuous-batching"
    with pytest.raises(TypeError):
        serve_in_background(app, port=free_port(), api_key="x")


def test_stop_while_a_reply_streams_frees_the_port(tiny_chat):
    handle = serve(tiny_chat)
    response = open_stream(handle)
    reader = content_chunks(response)
    next(reader)
    handle.stop()  # the open stream is cancelled after the grace period, not awaited forever
    assert not handle.running
    response.close()
    port = int(handle.url.rsplit(":", 1)[1])
    with serve_in_background(tiny_chat, port=port) as again:  # the same port serves again
        assert requests.get(again.url + "/health", timeout=10).status_code == 200


def test_a_stopped_server_lets_go_of_its_model(tiny_model_dir):
    """Notebook 02 frees GPU memory with stop, del and gc: nothing else may keep the model."""
    chat = TransformersChat.load(str(tiny_model_dir), verbose=False)
    model = weakref.ref(chat.model)
    handle = serve_in_background(create_app(chat), port=free_port())
    requests.get(handle.url + "/health", timeout=10).raise_for_status()
    requests.post(handle.url, json={"prompt": "hi", "max_length": 2}, timeout=30).raise_for_status()
    handle.stop()
    del chat, handle
    gc.collect()
    assert model() is None


def test_stop_mid_request_answers_503_and_ends_streams_with_an_error(tiny_chat):
    """Issue 24: a server that stops answers an open request honestly: 503 with a message for a
    whole reply (uvicorn's own cancellation gave a 500) and an error event that ends a stream (it
    was cut mid-way). The engine stops before uvicorn waits for open requests."""
    handle = serve(tiny_chat)
    whole: dict[str, Any] = {}

    def ask_whole() -> None:
        reply = requests.post(handle.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": LONG, "temperature": 0.8})
        whole.update(status=reply.status_code, body=reply.json())

    asker = threading.Thread(target=ask_whole)
    asker.start()
    response = open_stream(handle)
    lines = response.iter_lines()
    next(line for line in lines if line.startswith(b"data: {"))  # the stream is under way
    handle.stop()
    asker.join(30)
    rest = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
    assert whole["status"] == 503, whole
    assert "stop" in json.dumps(whole["body"]).lower() or "shut" in json.dumps(whole["body"]).lower()
    assert rest and "error" in rest[-1], rest[-3:]
