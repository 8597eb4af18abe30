"""``dhllm serve`` as a learner runs it: a separate process, then the chapter's curl.

The same curl answers from a local model and from an OpenAI-compatible cloud backend by changing
only ``--model``; the cloud one here is the local OpenAI fake, reached through OPENAI_BASE_URL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import requests

from helpers.cli import bind_warning
from tests.conftest import free_port
from tests.fakes.openai_fake import start_fake_openai

CURL = ("curl -s -X POST \"http://127.0.0.1:{port}\" -H 'Content-Type: application/json' "
        "-d '{{\"prompt\": \"如何应对压力\"}}'")


@contextmanager
def dhllm_serve(model: str, port: int, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run ``dhllm serve --model MODEL --port PORT`` until /health answers; stop it afterwards."""
    process = subprocess.Popen(
        [sys.executable, "-m", "helpers", "serve", "--model", model, "--port", str(port)],
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        yield
    finally:
        process.terminate()
        process.wait(30)


def chapter_curl(port: int) -> dict:
    result = subprocess.run(["bash", "-c", CURL.format(port=port)], capture_output=True, text=True,
                            timeout=120, check=True)
    return json.loads(result.stdout)


def test_the_same_curl_answers_from_a_local_and_a_cloud_model(tiny_model_dir):
    port = free_port()
    with dhllm_serve(str(tiny_model_dir), port):
        local = chapter_curl(port)
    assert local["status"] == 200 and local["history"][0][0] == "如何应对压力"

    # A port of its own: once freed, the first one may go to another test (make test runs two
    # workers), and the curl would reach that test's server.
    port = free_port()
    with start_fake_openai(api_key="test-key") as fake:
        cloud_env = {"OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": fake.base_url}
        with dhllm_serve("openai:gpt-4o-mini", port, cloud_env):
            cloud = chapter_curl(port)
        assert len(fake.model_requests) == 1
    assert cloud["status"] == 200
    assert cloud["response"].startswith("echo: 如何应对压力")  # the cloud model answered


def test_binding_every_interface_without_a_key_warns():
    assert "--api-key" in bind_warning("0.0.0.0", None)
    assert bind_warning("0.0.0.0", "a-key") is None
    assert bind_warning("127.0.0.1", None) is None


def test_sigterm_mid_stream_ends_it_with_an_error_event(tiny_model_dir):
    """Issue 24: Ctrl-C / SIGTERM of dhllm serve while a stream runs: the stream ends with an
    error event a client can see, never cut off without one (a silently short answer)."""
    port = free_port()
    with dhllm_serve(str(tiny_model_dir), port):
        reply = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", stream=True,
                              timeout=60, json={"messages": [{"role": "user", "content": "Go on."}],
                                                "max_tokens": 1500, "stream": True})
        lines = reply.iter_lines()
        next(line for line in lines if line.startswith(b"data: {"))  # under way
        server = next(p for p in psutil.process_iter(["cmdline"])
                      if str(port) in " ".join(p.info["cmdline"] or []) and "serve" in
                      " ".join(p.info["cmdline"] or []))
        server.terminate()
        rest = [line for line in lines if line.startswith(b"data: ")]
    assert any(b'"error"' in line for line in rest[-2:]), rest[-3:]
