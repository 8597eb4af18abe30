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

from helpers.server.vllm_process import find_vllm_python, gpu_command

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
