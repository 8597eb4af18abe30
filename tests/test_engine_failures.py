"""No request is ever lost: a failure in one stage ends exactly the streams that stage holds.

Each test makes one stage raise once (as an out-of-memory KV copy would), then checks that the
streams that stage held end with the error, the others finish with their solo text, and the
engine serves the next request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from helpers.chat import GenerationParams, TransformersChat
from helpers.server.engine import BatchingEngine, EngineStoppedError, Stream
from helpers.server.engine import batching as batching_module
from helpers.server.engine import kv_manager as kv_manager_module
from helpers.server.engine.kv_slots import SlotKV
from helpers.server.engine.prefill import PrefillGroup
from helpers.server.engine.prefix_cache import PrefixCache

GREEDY = GenerationParams(max_new_tokens=12, temperature=0, repetition_penalty=1.3)
RUNNER = GenerationParams(max_new_tokens=200, temperature=0, repetition_penalty=1.3)
LONG_PROMPT = "Tell me everything about the sea and the sky. " * 12


class Boom(RuntimeError):
    """The injected failure."""


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def raise_once(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, except that its first call raises ``Boom``."""
    calls = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise Boom("injected failure")
        return real(*args, **kwargs)

    wrapper.calls = calls  # type: ignore[attr-defined]
    return wrapper


def collect(stream: Stream, timeout: float = 300.0) -> tuple[str, BaseException | None]:
    """The stream's text and its error; fails the test if the stream never closes."""
    out: dict[str, Any] = {"text": [], "error": None}

    def read() -> None:
        try:
            for piece in stream:
                out["text"].append(piece)
        except Exception as exc:
            out["error"] = exc

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), "the stream never closed: the request was lost"
    return "".join(out["text"]), out["error"]


@pytest.fixture
def engine(tiny_chat: TransformersChat) -> Iterator[BatchingEngine]:
    eng = BatchingEngine(tiny_chat, max_batch_size=8, max_queue=8, prefill_chunk_tokens=8)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture
def solo(engine: BatchingEngine) -> dict[str, str]:
    """Each request's text when it runs alone (greedy: the reference)."""
    return {"runner": collect(engine.submit(user("Go on."), RUNNER))[0],
            "newcomer": collect(engine.submit(user(LONG_PROMPT), GREEDY))[0]}


@dataclass
class Running:
    """A runner mid-flight: its stream, its reader (kept: a dropped reader cancels) and head."""

    stream: Stream
    pieces: Iterator[str]
    head: str

    def rest(self) -> str:
        """The whole text, read to the end; it must end without an error."""
        text = self.head + "".join(self.pieces)
        assert self.stream.finish is not None and self.stream.finish.error is None
        return text


def running(engine: BatchingEngine) -> Running:
    """A runner mid-flight, one piece read.

    The tiny model decodes 200 tokens in a fraction of a second: each step is slowed by 10 ms
    so that the runner is still running when the newcomer arrives, however busy the machine.
    """
    decode = engine.runner.decode

    def slow_decode(batch: Any) -> Any:
        time.sleep(0.01)
        return decode(batch)

    engine.runner.decode = slow_decode  # type: ignore[method-assign]
    stream = engine.submit(user("Go on."), RUNNER)
    pieces = iter(stream)
    return Running(stream, pieces, next(pieces))


def serves_next(engine: BatchingEngine, solo: dict[str, str]) -> None:
    text, error = collect(engine.submit(user(LONG_PROMPT), GREEDY))
    assert error is None and text == solo["newcomer"]


def test_a_failed_join_ends_the_joining_streams_only(engine, solo, monkeypatch):
    real, calls = SlotKV.join, []

    def join(slots: SlotKV, *args: Any, **kwargs: Any) -> Any:
        if slots.rows and not calls:  # the first join beside running rows: the newcomer's
            calls.append(1)
            raise Boom("injected failure")
        return real(slots, *args, **kwargs)

    monkeypatch.setattr(SlotKV, "join", join)
    runner = running(engine)
    newcomer = engine.submit(user(LONG_PROMPT), GREEDY)
    _, error = collect(newcomer)
    assert isinstance(error, Boom) and newcomer.finish.reason == "error"
    assert runner.rest() == solo["runner"]
    assert calls and engine.stats.errors == 1
    serves_next(engine, solo)


# The stages that work on newcomers only: a failure there ends the newcomers, never the runner.
# Each newcomer's prompt differs from the others', so its stage really runs (no whole-prompt hit).
NEWCOMER_STAGES = {
    "prefill-chunk": (PrefillGroup, "step", " Again."),
    "lookup": (PrefixCache, "lookup", " Once more."),
}


@pytest.mark.parametrize("stage", NEWCOMER_STAGES)
def test_a_failed_newcomer_stage_ends_the_newcomers_only(engine, solo, monkeypatch, stage):
    owner, method, suffix = NEWCOMER_STAGES[stage]
    runner = running(engine)  # its own prefill is done: its first piece is out
    monkeypatch.setattr(owner, method, raise_once(getattr(owner, method)))
    newcomer = engine.submit(user(LONG_PROMPT + suffix), GREEDY)
    _, error = collect(newcomer)
    assert isinstance(error, Boom) and newcomer.finish.reason == "error"
    assert runner.rest() == solo["runner"]
    assert engine.stats.errors == 1
    serves_next(engine, solo)


def test_a_failed_decode_step_ends_the_running_rows_only(tiny_chat, monkeypatch):
    engine = BatchingEngine(tiny_chat, max_batch_size=1, max_queue=8)  # the second one waits
    engine.start()
    try:
        alone = collect(engine.submit(user(LONG_PROMPT), GREEDY))[0]
        queued, failed, real = threading.Event(), [], engine.runner.decode

        def decode_failing_once(batch: Any) -> Any:
            if not failed:  # the runner's first decode step, once the second request waits
                queued.wait(30)
                failed.append(1)
                raise Boom("injected failure")
            return real(batch)

        monkeypatch.setattr(engine.runner, "decode", decode_failing_once)
        runner = engine.submit(user("Go on."), RUNNER)
        waiting = engine.submit(user(LONG_PROMPT), GREEDY)
        queued.set()
        _, error = collect(runner)
        assert isinstance(error, Boom) and runner.finish.reason == "error"
        assert collect(waiting) == (alone, None)
        assert engine.stats.errors == 1
        assert collect(engine.submit(user(LONG_PROMPT), GREEDY)) == (alone, None)
    finally:
        engine.stop()


def test_a_failed_block_store_costs_blocks_never_a_reply(engine, solo, monkeypatch):
    # Storing blocks holds no stream (the rows already run): the prefix cache is an
    # optimisation, so every reply completes, and the failure is counted.
    store = raise_once(PrefixCache.store)
    monkeypatch.setattr(PrefixCache, "store", store)
    runner = running(engine)
    newcomer = engine.submit(user(LONG_PROMPT), GREEDY)
    assert collect(newcomer) == (solo["newcomer"], None)
    assert runner.rest() == solo["runner"]
    assert len(store.calls) > 1 and engine.stats.store_errors == 1
    assert engine.stats.errors == 0
    serves_next(engine, solo)


# The loop itself (issue 24): whatever fails, no stream is left open, and a dead engine says so.

def test_a_failure_outside_every_stage_ends_every_stream_then_serves_again(engine, monkeypatch):
    runner = running(engine)
    queued = engine.submit(user(LONG_PROMPT), GREEDY)
    monkeypatch.setattr(engine, "_update_gauges", raise_once(engine._update_gauges))
    _, error = collect(runner.stream, timeout=60)
    assert isinstance(error, Boom) and runner.stream.finish.reason == "error"
    _, error = collect(queued, timeout=60)
    assert error is not None and queued.finish.reason == "error"
    # The same worker goes on: the next request is served, no restart needed.
    assert collect(engine.submit(user("hi"), GREEDY), timeout=60)[1] is None
    assert engine._thread is not None and engine._thread.is_alive()


def test_a_worker_that_keeps_failing_stops_and_submit_refuses(engine, monkeypatch):
    def always(*_: Any, **__: Any) -> None:
        raise Boom("injected failure")

    monkeypatch.setattr(engine, "_update_gauges", always)
    for _ in range(batching_module.CRASH_LIMIT):
        _, error = collect(engine.submit(user("hi"), GREEDY), timeout=60)
        assert isinstance(error, Boom)
    engine._thread.join(30)
    with pytest.raises(EngineStoppedError, match="after an error") as refused:
        engine.submit(user("hi"), GREEDY)
    assert refused.value.status_code == 503
    monkeypatch.undo()
    engine.stop()
    engine.start()  # a new worker serves again
    assert collect(engine.submit(user("hi"), GREEDY))[1] is None


def test_a_failed_keep_finishes_each_row_exactly_once(engine, solo, monkeypatch):
    runner = running(engine)
    keep = raise_once(kv_manager_module.KVManager.retain)
    monkeypatch.setattr(kv_manager_module.KVManager, "retain", keep)
    newcomer = engine.submit(user(LONG_PROMPT), GREEDY)  # finishes first: its leave fails
    assert collect(newcomer) == (solo["newcomer"], None)
    _, error = collect(runner.stream)
    assert isinstance(error, Boom) and keep.calls
    # Each request counted once: the newcomer completed, the runner failed (solo's two too).
    assert (engine.stats.completed, engine.stats.errors) == (3, 1)


def test_a_stop_that_times_out_never_leaves_two_workers(engine):
    entered, release, decode = threading.Event(), threading.Event(), engine.runner.decode

    def stuck_decode(batch: Any) -> Any:
        entered.set()
        release.wait(30)
        return decode(batch)

    engine.runner.decode = stuck_decode  # type: ignore[method-assign]
    stream = engine.submit(user("Go on."), RUNNER)
    assert entered.wait(30)  # the worker is inside a step that does not return yet
    old = engine._thread
    engine.stop(timeout=0.1)
    assert old is not None and old.is_alive()  # still in its step
    threading.Timer(0.5, release.set).start()
    engine.start()  # waits for the old worker instead of starting a second one beside it
    assert not old.is_alive() and engine._thread is not old
    _, error = collect(stream)
    assert isinstance(error, EngineStoppedError)
    engine.runner.decode = decode  # type: ignore[method-assign]
    assert collect(engine.submit(user("hi"), GREEDY))[1] is None


def test_a_request_that_never_fits_the_kv_budget_is_refused_at_once(tiny_chat):
    engine = BatchingEngine(tiny_chat, kv_cache_mb=0.01)  # a few tokens of the tiny model
    engine.start()
    try:
        with pytest.raises(ValueError, match="DHLLM_KV_CACHE_MB"):
            engine.submit(user(LONG_PROMPT), GREEDY)
        assert engine.stats.submitted == 0
    finally:
        engine.stop()


def test_a_request_that_never_fits_gets_a_400_naming_the_setting(tiny_chat):
    import requests

    from helpers.server import serve_in_background
    from tests.conftest import free_port

    with serve_in_background(tiny_chat, port=free_port(), kv_cache_mb=0.01) as handle:
        response = requests.post(handle.url + "/v1/chat/completions", timeout=60, json={
            "messages": user(LONG_PROMPT), "max_tokens": 50})
        assert response.status_code == 400
        assert "DHLLM_KV_CACHE_MB" in response.json()["error"]["message"]
        chapter = requests.post(handle.url, timeout=60, json={"prompt": LONG_PROMPT})
        assert chapter.status_code == 400 and "DHLLM_KV_CACHE_MB" in chapter.json()["detail"]


def test_a_server_stopping_mid_request_answers_503_never_an_empty_200(tiny_chat):
    import requests

    from helpers.server import create_app, serve_in_background
    from tests.conftest import free_port

    app = create_app(tiny_chat)
    engine = app.state.engine
    with serve_in_background(app, port=free_port()) as handle:
        engine.eos = set()  # (as vLLM's ignore_eos) the reply below runs until the stop
        answer: dict[str, Any] = {}

        def ask() -> None:
            answer["response"] = requests.post(handle.url + "/v1/chat/completions", timeout=60,
                                               json={"messages": user("Tell me a story."),
                                                     "max_tokens": 1000})

        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 30
        while engine.stats.running < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        engine.stop()  # what the app's lifespan does when the server stops
        asker.join(60)
        response = answer["response"]
        assert response.status_code == 503, response.text
        assert "shutting down" in response.json()["error"]["message"]
        assert response.headers["Retry-After"]
