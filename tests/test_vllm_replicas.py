"""``dhllm serve --engine vllm --replicas 2``: two real vLLM CPU replicas behind vllm-router.

One set-up for the whole module (each replica on its own core, ``--enforce-eager``, 1 GiB of
KV cache; ~1-2 min on 2 cores): the chapter's ``POST /`` through the router, a conversation
that stays on the replica holding its prefix, the router alone over replicas given as URLs,
a replica killed under load (no request lost, a cut stream continued token for token, it comes
back), a hung engine core taken out, and nothing left running after stop. Skips, saying why,
where vLLM or vllm-router is not installed (``make vllm``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest
import requests

from helpers.background_server import ServerHandle, free_port
from helpers.bench.persona import conversation
from helpers.config import get_settings
from helpers.server import create_app, serve_in_background
from helpers.server.vllm.relay import VLLMEngine
from helpers.server.vllm.replicas import ReplicaSet, gpu_ids
from helpers.server.vllm.router import find_router_python
from helpers.server.vllm.venv import find_vllm_python


def _missing() -> str | None:
    python = find_vllm_python(get_settings().vllm_python)  # DHLLM_VLLM_PYTHON, .venv-vllm
    if python is None:
        return "vLLM is not installed (make vllm: Linux x86-64 only)"
    if find_router_python(beside=python) is None:
        return "vllm-router is not installed beside vLLM (make vllm)"
    return None


MISSING = _missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]
TOPICS = ["a ship", "a robot", "a cat", "the sea", "a mountain", "a city", "a garden", "a train"]


@pytest.fixture(scope="module")
def replicas_app() -> Iterator[tuple[ServerHandle, VLLMEngine]]:
    from helpers.server.vllm.launch import start_vllm_engine

    settings = get_settings(vllm_args="--enforce-eager", vllm_kvcache_gb=1, vllm_replicas=2,
                            api_key=None)
    chat_model, engine = start_vllm_engine("embedded", settings)
    with serve_in_background(create_app(chat_model, settings, engine=engine),
                             port=free_port()) as handle:
        yield handle, engine
    # Leaving the block stops the app, the router and both replicas (idempotent).


def replica_set(engine: VLLMEngine) -> ReplicaSet:
    assert isinstance(engine.process, ReplicaSet)
    return engine.process


def replicas_health(url: str) -> dict[str, Any]:
    return requests.get(url + "/health", timeout=10).json()["replicas"]


def cached_tokens_by_turn(url: str, turns: int) -> list[int]:
    """Turns of the persona conversation (a fresh prefix each call), cached tokens of each."""
    from openai import OpenAI

    client, answers, cached = OpenAI(base_url=url + "/v1", api_key="unused"), [], []
    salt = f"[visit {uuid.uuid4().hex}] "  # no replica has seen this prefix before
    for turn in range(turns):
        messages = conversation(answers, turn)
        messages[0]["content"] = salt + messages[0]["content"]
        reply = client.chat.completions.create(model="embedded", messages=messages,
                                               max_tokens=16, temperature=0)
        answers.append(reply.choices[0].message.content)
        details = reply.usage.prompt_tokens_details
        cached.append(details.cached_tokens if details else 0)
    return cached


def test_two_replicas_serve_the_chapter_through_the_router(
        replicas_app: tuple[ServerHandle, VLLMEngine]) -> None:
    handle, engine = replicas_app
    replicas = replica_set(engine)
    assert replicas_health(handle.url) == {
        "total": 2, "healthy": 2, "hung": 0, "restarts": 0, "retried": 0, "continued": 0,
        "policy": "cache_aware", "router": "up", "router_restarts": 0}
    workers = replicas.router.workers()
    assert sorted(w["url"] for w in workers) == sorted(r.url for r in replicas.replicas)
    assert all(w["is_healthy"] for w in workers)
    if not gpu_ids():  # on a CPU each replica's threads are pinned to cores of its own
        binds = [r.process.environment()["VLLM_CPU_OMP_THREADS_BIND"] for r in replicas.replicas]
        assert len(set(binds)) == 2, binds
    reply = requests.post(handle.url, json={"prompt": "What is the capital of France?",
                                            "temperature": 0, "max_length": 16}, timeout=120)
    assert reply.status_code == 200 and "Paris" in reply.json()["response"]


def test_a_conversation_stays_on_the_replica_that_holds_its_prefix(
        replicas_app: tuple[ServerHandle, VLLMEngine]) -> None:
    cached = cached_tokens_by_turn(replicas_app[0].url, turns=4)
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached


def test_replicas_elsewhere_get_only_a_router(
        replicas_app: tuple[ServerHandle, VLLMEngine]) -> None:
    from helpers.server.vllm.launch import start_vllm_engine

    replicas = replica_set(replicas_app[1])
    urls = ",".join(r.url for r in replicas.replicas)
    settings = get_settings(vllm_url=urls, vllm_policy="round_robin", api_key=None)
    chat_model, engine = start_vllm_engine("embedded", settings)
    gateway = replica_set(engine)
    assert all(r.process is None for r in gateway.replicas)  # watched, not started
    with serve_in_background(create_app(chat_model, settings, engine=engine),
                             port=free_port()) as handle:
        assert replicas_health(handle.url)["healthy"] == 2
        # Round robin sends turn 2 to the other replica, which never saw the prefix.
        assert cached_tokens_by_turn(handle.url, turns=2) == [0, 0]
        router = gateway.router.pid
    assert not psutil.pid_exists(router) or psutil.Process(router).status() == psutil.STATUS_ZOMBIE
    assert all(r.process.running for r in replicas.replicas)  # ours are untouched


def running_upstream(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)", text,
                                            re.M))


def ask(url: str, i: int) -> requests.Response:
    body = {"model": "embedded", "max_tokens": 48, "temperature": 0.7,
            "messages": [{"role": "user", "content": f"Write a story about {TOPICS[i % 8]}."}]}
    return requests.post(url + "/v1/chat/completions", json=body, timeout=300)


def wait_until_both_healthy(url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 400  # a restart is a full vLLM start (1-2 min on 2 cores)
    while replicas_health(url)["healthy"] < 2 and time.monotonic() < deadline:
        time.sleep(1)
    return replicas_health(url)


def greedy_stream(url: str, on_piece: Any = None) -> tuple[str, int]:
    """A greedy streamed answer: its text and its completion tokens (from usage)."""
    body = {"model": "embedded", "max_tokens": 160, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Tell a long story about a lighthouse "
                                                     "keeper and a storm."}]}
    pieces, tokens = [], 0
    with requests.post(url + "/v1/chat/completions", json=body, stream=True,
                       timeout=120) as reply:  # read timeout: a hang fails the test
        for line in reply.iter_lines(decode_unicode=True):
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[5:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                pieces.append(choice["delta"].get("content") or "")
                if on_piece is not None:
                    on_piece(len(pieces))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return "".join(pieces), tokens


def test_a_replica_killed_under_load_loses_nothing_and_comes_back(
        replicas_app: tuple[ServerHandle, VLLMEngine]) -> None:
    """kill -9 of the replica that streams a greedy answer, with 8 plain requests in flight: the
    plain ones all answer, the stream goes on on the other replica token for token, the dead
    one is out of routing at once and back after a restart. (One test: each restart is a full
    vLLM start, 1-2 min on 2 cores.)"""
    handle, engine = replicas_app
    replicas = replica_set(engine)
    undisturbed, tokens = greedy_stream(handle.url)
    assert tokens > 60, (undisturbed, tokens)  # long enough to be cut in the middle
    continued = engine.continued
    victim: list[Any] = []
    with ThreadPoolExecutor(8) as pool:
        plain: list[Any] = []

        def load_then_kill(pieces: int) -> None:
            if pieces == 4:  # the stream runs alone: the replica with a request running has it
                for _ in range(20):  # (unless a supervisor's 1-token probe runs just then)
                    busy = [r for r in replicas.replicas if running_upstream(r.url) > 0]
                    if len(busy) == 1:
                        break
                    time.sleep(0.05)
                assert len(busy) == 1, busy
                victim.append(busy[0])
                plain.extend(pool.submit(ask, handle.url, i) for i in range(8))
            elif pieces == 24:  # the plain requests have reached the replicas by now
                assert running_upstream(victim[0].url) > 0
                os.kill(victim[0].process.pid, signal.SIGKILL)  # its engine core is left running

        engine_core = psutil.Process(replicas.replicas[0].process.pid).children(recursive=True)
        engine_core += psutil.Process(replicas.replicas[1].process.pid).children(recursive=True)
        joined, joined_tokens = greedy_stream(handle.url, load_then_kill)
        replies = [f.result() for f in plain]
    assert [r.status_code for r in replies] == [200] * 8, [r.text[:200] for r in replies]
    assert all(r.json()["choices"][0]["message"]["content"] for r in replies)
    # Whole: the cut stream went on on the other replica, never a hang or an error.
    assert engine.continued == continued + 1
    assert joined == undisturbed and joined_tokens == tokens
    # Taken out at once (the restart, a full vLLM start, is still under way).
    assert replicas_health(handle.url)["healthy"] == 1
    assert victim[0].url not in [w["url"] for w in replicas.router.workers() if w["is_healthy"]]
    health = wait_until_both_healthy(handle.url)
    assert health["healthy"] == 2 and health["restarts"] == 1, health
    assert victim[0].url in [w["url"] for w in replicas.router.workers() if w["is_healthy"]]
    survivors = {p.pid for r in replicas.replicas
                 for p in psutil.Process(r.process.pid).children(recursive=True)}
    left = [p.pid for p in engine_core if p.pid not in survivors and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"the killed replica's engine core outlived it: {left}"
    assert ask(handle.url, 0).status_code == 200


def test_a_hung_engine_core_is_taken_out_and_let_back_when_it_generates(
        replicas_app: tuple[ServerHandle, VLLMEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGSTOPped engine core: its API server still says 200 on /health, but the replica is
    taken out because it generates nothing; continued, it is let back without a restart.
    (The restart after more misses, a stopped process group replaced, is tested on a stand-in
    in test_replica_supervision.py: here it would cost a full vLLM start.)"""
    from helpers.server.vllm import replicas as replicas_module

    monkeypatch.setattr(replicas_module, "RESTART_AFTER", 10_000)
    handle, engine = replicas_app
    replicas = replica_set(engine)
    victim = replicas.replicas[0]
    restarts = replicas_health(handle.url)["restarts"]
    engine_core = psutil.Process(victim.process.pid).children(recursive=True)
    assert engine_core
    for proc in engine_core:  # its API server goes on answering /health
        proc.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while replicas_health(handle.url)["hung"] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert replicas_health(handle.url)["healthy"] == 1
        assert victim.url not in [w["url"] for w in replicas.router.workers()]
        assert ask(handle.url, 1).status_code == 200  # served by the other one meanwhile
    finally:
        for proc in engine_core:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while replicas_health(handle.url)["healthy"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    health = replicas_health(handle.url)
    assert health["healthy"] == 2 and health["hung"] == 0 and health["restarts"] == restarts
    assert victim.url in [w["url"] for w in replicas.router.workers() if w["is_healthy"]]


def test_a_killed_router_is_started_again(replicas_app: tuple[ServerHandle, VLLMEngine]) -> None:
    handle, engine = replicas_app
    replicas = replica_set(engine)
    os.kill(replicas.router.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while replicas_health(handle.url)["router_restarts"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    health = replicas_health(handle.url)
    assert health["router"] == "up" and health["router_restarts"] == 1, health
    assert ask(handle.url, 2).status_code == 200


def test_stopping_dhllm_stops_every_replica_and_the_router(
        replicas_app: tuple[ServerHandle, VLLMEngine]) -> None:
    handle, engine = replicas_app  # the last test: it stops the module's server
    replicas = replica_set(engine)
    roots = [replicas.router.pid] + [r.process.pid for r in replicas.replicas]
    tree = [p for pid in roots for p in [psutil.Process(pid),
                                         *psutil.Process(pid).children(recursive=True)]]
    assert len(tree) >= 5, "each replica runs an engine core beside its API server"
    handle.stop()
    _, alive = psutil.wait_procs(tree, timeout=30)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
    for url in [replicas.router.url] + [r.url for r in replicas.replicas]:
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/health", timeout=2)
