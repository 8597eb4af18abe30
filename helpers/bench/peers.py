"""Servers under test, each in its own process, started by name from the ``PEERS`` registry.

Adding a peer is a few lines: a function that takes a ``PeerRequest`` and returns a started
``Handle`` (anything with ``url``, ``model``, ``wait()`` and ``stop()``), registered under a
name with its table label (``VLLMPeer`` below is one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import requests

from helpers.background_server import free_port


class Handle(Protocol):
    """A server under test: where it listens, the model name its API wants, start and stop."""

    url: str
    model: str

    def wait(self, timeout: float = 180.0) -> Handle: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class PeerRequest:
    """What a peer needs to start: the model spec (for dhllm), its folder, the reply length."""

    model: str
    model_dir: str
    model_name: str  # the name our server answers to
    tokens: int


@dataclass(frozen=True)
class Peer:
    """A registered server: its results key, its table label and how to start it."""

    key: str
    label: str
    start: Callable[[PeerRequest], Handle]
    # Its /v1 takes top_k and repetition_penalty as fields (transformers serve 5.25 takes them
    # only inside a ``generation_config`` JSON string: not sent, no chapter column for it).
    chapter_sampling: bool = False


class ServerProcess:
    """A server in its own process, as in production, so the load generator's threads do not
    compete with it for the GIL (in one process they cost our server ~40 % of its throughput)."""

    def __init__(self, cmd: list[str], port: int, model: str,
                 env: dict[str, str] | None = None) -> None:
        self.port, self.model = port, model
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"dhllm-bench-server-{port}.log"
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})

    def wait(self, timeout: float = 180.0) -> ServerProcess:
        """Return once ``/health`` answers 200; raise if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-500:]
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {tail}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the server did not answer /health within {timeout:.0f} s")

    def stop(self) -> None:
        """Terminate the process (kill it if it lingers)."""
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dhllm_process(req: PeerRequest, max_batch_size: int | None = None,
                  env: dict[str, str] | None = None, engine: str | None = None) -> ServerProcess:
    """``dhllm serve`` with its defaults (the KV budget decides the batch); ``max_batch_size=1``
    makes it the serial baseline."""
    port = free_port()
    cmd = [sys.executable, "-m", "helpers", "serve", "--model", req.model, "--port", str(port)]
    if engine:
        cmd += ["--engine", engine]
    settings = {"DHLLM_DEFAULT_MAX_NEW_TOKENS": str(req.tokens), "DHLLM_API_KEY": ""}
    if max_batch_size is not None:
        settings["DHLLM_MAX_BATCH_SIZE"] = str(max_batch_size)
    return ServerProcess(cmd, port, req.model_name, {**settings, **(env or {})})


def transformers_process(req: PeerRequest, continuous_batching: bool) -> ServerProcess:
    """``transformers serve MODEL_DIR --port P --device cpu [--continuous-batching]``."""
    exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    port = free_port()
    cmd = [exe, "serve", req.model_dir, "--port", str(port), "--device", "cpu"]
    if continuous_batching:
        cmd.append("--continuous-batching")
    return ServerProcess(cmd, port, req.model_dir)


PEERS: dict[str, Peer] = {
    "dhllm": Peer("ours", "dhllm (continuous batching)", dhllm_process, True),
    "serial": Peer("serial", "serial chapter-style",
                   lambda req: dhllm_process(req, max_batch_size=1), True),
    "plain": Peer("transformers_serve", "transformers serve",
                  lambda req: transformers_process(req, False)),
    "cb": Peer("transformers_serve_cb", "transformers serve --cont.-batch.",
               lambda req: transformers_process(req, True)),
    "vllm": Peer("vllm", "vLLM (bare)", lambda req: VLLMPeer(req), True),
    "dhllm-vllm": Peer("dhllm_vllm", "dhllm --engine vllm",
                       lambda req: dhllm_process(req, engine="vllm"), True),
}


class VLLMPeer:
    """Bare vLLM, started as ``dhllm serve --engine vllm`` starts it (same flags), for the
    relay's overhead to be the only difference between the two."""

    def __init__(self, req: PeerRequest) -> None:
        from helpers.server.vllm import VLLMProcess, find_vllm_python

        python = find_vllm_python(os.environ.get("DHLLM_VLLM_PYTHON"))
        if python is None:
            raise RuntimeError("vLLM is not installed (make vllm)")
        self.model = req.model_name
        self.process = VLLMProcess(req.model_dir, req.model_name, free_port(), python,
                                   extra_args=["--enable-prompt-tokens-details"])
        self.url = self.process.url

    def wait(self, timeout: float = 600.0) -> VLLMPeer:
        self.process.start(timeout=max(timeout, 600.0))  # torch.compile: ~60-95 s here
        return self

    def stop(self) -> None:
        self.process.stop()
