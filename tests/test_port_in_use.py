"""A busy port names the process that holds it and how to stop it (real listeners, real psutil)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from fastapi import FastAPI

import helpers.background_server as background_server
from helpers.background_server import PortInUseError, port_in_use_message, start_uvicorn
from tests.conftest import free_port

LISTENER = """
import socket, sys, time
sock = socket.socket()
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen()
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held_port() -> Iterator[tuple[int, int]]:
    """``(port, pid)``: a port another process listens on."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(port)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield port, proc.pid
    finally:
        proc.kill()
        proc.wait(10)


def health_app() -> FastAPI:
    app = FastAPI()
    app.get("/health")(lambda: {"ok": True})
    return app


def test_busy_port_names_the_holder_and_how_to_stop_it(held_port):
    port, pid = held_port
    with pytest.raises(PortInUseError) as info:
        start_uvicorn(health_app(), port=port)
    message = str(info.value)
    assert f"进程 {pid}（" in message and "socket" in message  # its command line
    assert (f"taskkill /PID {pid} /F" if sys.platform == "win32" else f"kill {pid}") in message
    assert f"port={port + 1}" in message and "stop()" not in message  # no handle they lack


def test_a_port_held_by_this_process_points_at_its_own_handle():
    port = free_port()
    handle = start_uvicorn(health_app(), port=port)
    try:
        message = port_in_use_message("127.0.0.1", port)
    finally:
        handle.stop()
    assert f"进程 {os.getpid()}" in message and "server.stop()" in message
    assert f"kill {os.getpid()}" not in message  # never tell a notebook to kill its own kernel


def test_a_jupyter_kernel_holder_is_told_to_shut_down_that_kernel(monkeypatch):
    kernel = ["python", "-m", "ipykernel_launcher", "-f", "kernel-1.json"]
    monkeypatch.setattr(background_server, "port_holder", lambda port: (4242, kernel))
    message = port_in_use_message("127.0.0.1", 7871)
    assert "进程 4242（python -m ipykernel_launcher" in message
    assert "关闭那个 notebook 的内核" in message


def test_an_invisible_holder_is_said_plainly(monkeypatch):
    monkeypatch.setattr(background_server, "port_holder", lambda port: None)
    message = port_in_use_message("127.0.0.1", 7871)
    assert "psutil 看不到" in message and "port=7872" in message and "stop()" not in message


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # its sys.exit
def test_uvicorn_dying_at_start_gives_the_same_message(held_port, monkeypatch):
    port, pid = held_port
    monkeypatch.setattr(background_server, "ensure_port_free", lambda host, port: None)  # let uvicorn try
    with pytest.raises(PortInUseError, match=f"进程 {pid}（"):
        start_uvicorn(health_app(), port=port, log_level="critical")


def test_a_wildcard_bind_is_shown_as_loopback():
    # One rule for every server (API, mirror) that prints or returns its URL.
    assert background_server.display_url("0.0.0.0", 7871) == "http://127.0.0.1:7871"
    assert background_server.display_url("::", 8090) == "http://127.0.0.1:8090"
    assert background_server.display_url("192.168.1.20", 7871) == "http://192.168.1.20:7871"
