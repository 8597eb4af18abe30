"""dhllm in front of a real vLLM (its CPU build, in its own venv): the chapter's contract, the
OpenAI API with streaming, the API key, cancellation upstream, and no orphan process.

Skips (saying why) where vLLM is not installed: ``make vllm`` installs it on Linux x86-64.
vLLM starts once for the module, with ``--enforce-eager``: ~20 s instead of ~60-90 s of
torch.compile. The last test stops it and checks that nothing is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from helpers.background_server import ServerHandle, free_port
from helpers.config import get_settings
from helpers.server import create_app, serve_in_background
from helpers.server.vllm.relay import VLLMEngine
from helpers.server.vllm.venv import find_vllm_python

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_vllm_python(get_settings().vllm_python) is None,
                       reason="vLLM is not installed (make vllm: Linux x86-64 only)"),
]
KEY = "dhllm-vllm-test-key"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


PROGRESS: list[str] = []


@pytest.fixture(scope="module")
def vllm_app() -> Iterator[tuple[ServerHandle, VLLMEngine]]:
    from helpers.server.vllm.launch import start_vllm_engine

    settings = get_settings(vllm_args="--enforce-eager", vllm_kvcache_gb=1)
    chat_model, engine = start_vllm_engine("embedded", settings, progress=PROGRESS.append)
    with serve_in_background(create_app(chat_model, settings, engine=engine),
                             port=free_port()) as handle:
        yield handle, engine
    # Leaving the block stops the app, and with it the engine and vLLM (idempotent).


@pytest.fixture(scope="module")
def server(vllm_app: tuple[ServerHandle, VLLMEngine]) -> ServerHandle:
    return vllm_app[0]


def running_upstream(engine: VLLMEngine) -> float:
    """vLLM's own count of requests it is generating (its Prometheus metrics)."""
    text = requests.get(engine.process.url + "/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)", text,
                                            re.M))


def test_start_reports_progress_and_a_busy_port_is_refused_at_once(
        vllm_app: tuple[ServerHandle, VLLMEngine]) -> None:
    from helpers.background_server import PortInUseError
    from helpers.server.vllm.process import VLLMProcess

    _, engine = vllm_app
    assert PROGRESS[-1].startswith("vLLM ready"), PROGRESS
    busy = VLLMProcess(engine.process.model_dir, "x", engine.process.port,
                       engine.process.python)
    started = time.monotonic()
    with pytest.raises(PortInUseError, match=str(engine.process.port)):
        busy.start()
    assert time.monotonic() - started < 5  # not after a minute of start-up


def test_the_chapters_curl_and_history(server: ServerHandle) -> None:
    first = requests.post(server.url, json={"prompt": FRANCE[0]["content"], "temperature": 0,
                                            "max_length": 16}, timeout=120).json()
    assert "Paris" in first["response"]
    assert first["history"] == [[FRANCE[0]["content"], first["response"]]]
    second = requests.post(server.url, json={"prompt": "And of Germany?", "temperature": 0,
                                             "history": first["history"], "max_length": 16},
                           timeout=120).json()
    assert len(second["history"]) == 2 and second["history"][0] == first["history"][0]
    assert second["response"]


def test_the_openai_sdk_streams(server: ServerHandle) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="embedded", messages=FRANCE, temperature=0, max_tokens=16, stream=True)
        if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and "Paris" in "".join(pieces)
    whole = client.chat.completions.create(model="embedded", messages=FRANCE, temperature=0,
                                           max_tokens=16)
    assert whole.choices[0].message.content == "".join(pieces)  # greedy: the same answer
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 10


def test_a_disconnect_stops_the_generation_upstream(
        vllm_app: tuple[ServerHandle, VLLMEngine]) -> None:
    server, engine = vllm_app
    body = {"model": "embedded", "stream": True, "max_tokens": 1500, "temperature": 1.0,
            "messages": [{"role": "user", "content": "Write a very long story about a ship."}]}
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True,
                       timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert running_upstream(engine) == 1
    deadline = time.monotonic() + 5
    while running_upstream(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running_upstream(engine) == 0
    assert engine.stats.cancelled >= 1


def test_a_second_gateway_with_a_key_and_503_when_vllm_is_down(
        vllm_app: tuple[ServerHandle, VLLMEngine]) -> None:
    from helpers.server.vllm.launch import start_vllm_engine

    server, engine = vllm_app
    # Another stateless gateway in front of the same vLLM (DHLLM_VLLM_URL): nothing started.
    settings = get_settings(api_key=KEY, vllm_url=engine.process.url)
    chat_model, guarded = start_vllm_engine("embedded", settings)
    assert guarded.process is None
    with serve_in_background(create_app(chat_model, settings, engine=guarded),
                             port=free_port()) as handle:
        assert requests.post(handle.url, json={"prompt": "hi"}, timeout=30).status_code == 401
        ok = requests.post(handle.url, json={"prompt": "hi", "max_length": 4},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["response"]
    dead = VLLMEngine(engine.chat_model, f"http://127.0.0.1:{free_port()}/v1", "embedded")
    with serve_in_background(create_app(engine.chat_model, get_settings(), engine=dead),
                             port=free_port()) as handle:
        down = requests.post(handle.url + "/v1/chat/completions",
                             json={"model": "x", "messages": FRANCE}, timeout=30)
        assert down.status_code == 503
        assert "vLLM is not answering" in down.json()["error"]["message"]


def test_stopping_dhllm_stops_vllm(vllm_app: tuple[ServerHandle, VLLMEngine]) -> None:
    handle, engine = vllm_app  # the last test: it stops the module's server
    pid, port = engine.process.pid, engine.process.port
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    assert len(tree) > 1, "vLLM runs its engine core in child processes"
    assert requests.get(handle.url + "/health", timeout=5).json()["engine"] == "vllm"
    handle.stop()
    gone, alive = psutil.wait_procs(tree, timeout=20)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {[p.pid for p in alive]}"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=2)


def _engine_core_started(dhllm: subprocess.Popen) -> list[psutil.Process]:
    """dhllm's descendants once vLLM's engine core is among them (``VLLM::EngineCore``)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and dhllm.poll() is None:
        tree = psutil.Process(dhllm.pid).children(recursive=True)
        with contextlib.suppress(psutil.Error):
            if any("EngineCore" in " ".join([p.name(), *p.cmdline()]) for p in tree):
                return tree
        time.sleep(0.5)
    raise AssertionError("vLLM's engine core never started")


def test_a_kill_9_of_dhllm_leaves_no_vllm_process() -> None:
    """``dhllm serve --engine vllm`` killed hard while vLLM is still starting (a learner's
    interrupted cell, the commonest case): its API server, engine core and the rest die with it
    (before the watchdog, 8 of 9 descendants of a 2-replica dhllm kept running)."""
    port = free_port()
    env = {**os.environ, "DHLLM_VLLM_ARGS": "--enforce-eager", "DHLLM_VLLM_KVCACHE_GB": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    dhllm = subprocess.Popen([sys.executable, "-m", "helpers", "serve", "--model", "embedded",
                              "--engine", "vllm", "--port", str(port)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree: list[psutil.Process] = []
    try:
        tree = _engine_core_started(dhllm)
        assert len(tree) >= 3, "vLLM's API server, its engine core, the watchdog"
        dhllm.kill()
        dhllm.wait(10)
        _, alive = psutil.wait_procs(tree, timeout=15)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
    finally:
        dhllm.kill()
        for proc in tree:  # if it failed, the orphans are ours to end, by pid
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
