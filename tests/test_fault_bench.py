"""The fault bench counts what a client sees, in the right column.

A fake OpenAI server on 127.0.0.1 answers whole, short, cut, with an error or not at all, as
each test says: each kind must land in its own column (so the bench cannot report 0 silently
short answers by construction). Then the cheap part of the bench runs for real: an exception in
the builtin engine's decode step and a stop under load, on a tiny model over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from helpers.background_server import ServerHandle, free_port, start_uvicorn
from helpers.bench.fault_cases import (
    MARK,
    STAGES,
    Baseline,
    builtin_faults,
    kill_ours,
    left_over,
    wrap_stage,
)
from helpers.bench.fault_load import Load, classify, references, send, under_load
from helpers.bench.faults import markdown, write_block
from helpers.server.engine import create_engine

WORDS = ["one", " two", " three", " four", " five", " six", " seven", " eight"]
HANG_S = 1.5  # the client's timeout in these tests (the bench's is 30 s)


def fake_app(state: dict[str, str]) -> FastAPI:
    """An OpenAI-style server whose ``state["mode"]`` says how it misbehaves."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"data": [{"id": "fake"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body, mode = await request.json(), state["mode"]
        asked = body["max_tokens"]
        words = WORDS[:3] if mode == "short" else WORDS[:asked]
        finish = ("length" if mode == "length" or len(words) == asked else "stop")
        finish = None if mode == "cut" else finish
        tokens = asked - 2 if mode == "length" else len(words)
        if body.get("stream"):
            return StreamingResponse(_events(words, finish, tokens, mode),
                                     media_type="text/event-stream")
        if mode == "error":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if mode == "hang":
            await asyncio.sleep(HANG_S * 3)
        return {"choices": [{"message": {"content": "".join(words)}, "finish_reason": finish}],
                "usage": {"completion_tokens": tokens}}

    return app


async def _events(words: list[str], finish: str | None, tokens: int,
                  mode: str) -> AsyncIterator[str]:
    def data(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    for i, word in enumerate(words):
        await asyncio.sleep(0.02)
        yield data({"choices": [{"delta": {"content": word}, "finish_reason": None}]})
        if mode == "error" and i == 1:
            yield data({"error": {"message": "the engine died"}})
            yield "data: [DONE]\n\n"
            return
        if mode == "hang" and i == 1:
            for _ in range(int(HANG_S * 3 / 0.2)):  # keep-alive pings, nothing else
                await asyncio.sleep(0.2)
                yield ": ping\n\n"
    if mode != "cut":
        yield data({"choices": [{"delta": {}, "finish_reason": finish}]})
        yield data({"choices": [], "usage": {"completion_tokens": tokens}})
    yield "data: [DONE]\n\n"


@pytest.fixture
def fake() -> Iterator[tuple[ServerHandle, dict[str, str]]]:
    state = {"mode": "whole"}
    handle = start_uvicorn(fake_app(state), host="127.0.0.1", port=free_port())
    try:
        yield handle, state
    finally:
        state["mode"] = "whole"
        handle.stop()


EXPECTED = {"whole": "whole", "short": "short", "cut": "short", "length": "short",
            "error": "error", "hang": "hanging"}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole reply"])
def test_each_kind_of_answer_lands_in_its_column(fake, stream):
    handle, state = fake
    refs = references(handle.url, "fake", ["hi"], 10)
    for mode, column in EXPECTED.items():
        state["mode"] = mode
        reply = classify(send(handle.url, "fake", "hi", 10, stream, HANG_S), refs["hi"], 10)
        assert reply.verdict == column, (mode, reply)


def test_a_fault_under_load_is_counted_and_timed(fake):
    handle, state = fake
    refs = references(handle.url, "fake", ["a", "b"], 10)

    def inject() -> list[str]:
        state["mode"] = "error"  # errors for a second, then silently short for a second
        threading.Timer(1.0, lambda: state.update(mode="short")).start()
        threading.Timer(2.0, lambda: state.update(mode="whole")).start()
        return ["errors, then short answers"]

    load = Load(clients=3, tokens=10, after_s=3.0, per_client=60, hang_s=HANG_S, recover_s=8)
    result = under_load("errors then short", handle.url, "fake", refs, load, inject,
                        log=lambda _: None)
    assert result.short >= 1 and result.error >= 1 and result.whole >= 1
    assert result.sent == result.whole + result.short + result.error and not result.hanging
    assert result.served_again_s is not None and result.served_again_s >= 1.9
    # The first probes met the errors: said in the notes, never mixed into the load's columns.
    assert any(n.startswith("probes (not counted above): ") and "error" in n
               for n in result.notes), result.notes
    row = markdown([result]).splitlines()[-1]
    assert row.startswith(f"| errors then short | {result.sent} | {result.whole} | {result.error} | "
                          f"{result.short} | 0 | - | {result.served_again_s:.1f} s |")


def test_hanging_requests_are_counted_even_when_the_server_pings(fake):
    handle, state = fake
    refs = references(handle.url, "fake", ["a"], 10)
    load = Load(clients=2, tokens=10, after_s=1.0, per_client=2, hang_s=HANG_S, recover_s=1)
    result = under_load("hang", handle.url, "fake", refs, load,
                        lambda: state.update(mode="hang"), probe=False, log=lambda _: None)
    assert result.hanging >= 1 and result.sent == result.whole + result.hanging
    started = time.monotonic()
    reply = send(handle.url, "fake", "a", 10, True, HANG_S)  # pings every 0.2 s, no tokens
    assert reply.timed_out and time.monotonic() - started < HANG_S + 1


def test_the_builtin_engine_faults_run_for_real(tiny_chat):
    before = Baseline()
    load = Load(clients=3, tokens=24, after_s=1.0, per_client=6, hang_s=10, recover_s=10)
    decode, stop = builtin_faults(tiny_chat, load, lambda _: None, before, ["decode"])
    assert decode.notes[0] == "raised once in runner.decode"
    # The decode step that raised held running rows: they end with an error the client sees.
    assert decode.error >= 1
    for result in (decode, stop):
        assert result.sent and result.sent == (result.whole + result.error + result.short
                                               + result.hanging)
        assert result.left_over == 0
    assert stop.served_again == "n/a"


def _orphan(env: dict[str, str]) -> int:
    """The pid of a sleeping process whose parent has already exited (as under kill -9)."""
    code = ("import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)'], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL).pid)")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30,
                         capture_output=True, text=True)
    return int(out.stdout)


def test_processes_left_over_are_found_and_killed():
    run, before = uuid.uuid4().hex, Baseline()
    marked = _orphan({**os.environ, MARK: run})  # found by the mark in its environment
    # vLLM's setproctitle empties what /proc/PID/environ shows: found because it was seen
    # below a server of the run while that was alive.
    env = {k: v for k, v in os.environ.items() if k != MARK}
    unmarked = _orphan(env)
    assert {p.pid for p in left_over(run, before)} == {marked}
    before.remember(unmarked)
    assert {p.pid for p in left_over(run, before)} == {marked, unmarked}
    assert kill_ours(run, before) == 2
    assert left_over(run, before, grace_s=5) == []


def test_a_rerun_replaces_its_own_table_and_keeps_the_others(tmp_path: Path):
    path = tmp_path / "faults.md"
    path.write_text("# Faults\n\nprose\n", encoding="utf-8")
    write_block(path, "before the fixes", "| a |")
    write_block(path, "after the fixes", "| b |")
    write_block(path, "before the fixes", "| c |")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Faults\n\nprose\n")
    assert "| a |" not in text and text.index("| c |") < text.index("| b |")


def test_every_builtin_stage_the_bench_breaks_exists(tiny_chat):
    """A renamed engine part must not turn a fault into 'no such stage here' unnoticed."""
    for name, (part, method) in STAGES.items():
        assert wrap_stage(create_engine(tiny_chat), part, method) is not None, name
