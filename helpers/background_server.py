"""Run an ASGI app with uvicorn in a daemon thread: the way to serve from Jupyter.

``uvicorn.run()`` fails inside Jupyter (an event loop is already running), and on a busy port
uvicorn calls ``sys.exit(1)`` inside its thread, which dies silently. This module checks both.
Used by the API server and the local mirror alike. Also: free ports, who holds a busy port, and
the URL a server on a host answers at (``display_url``).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
import uvicorn


class PortInUseError(OSError):
    """The port is taken; the message says which and how to pick another."""


class StoppingServer(uvicorn.Server):
    """uvicorn's server that calls ``before_shutdown`` (on its loop) before it waits for requests.

    uvicorn's own order is: stop listening, wait for open requests (``timeout_graceful_shutdown``),
    cancel the rest, and only then the app's lifespan shutdown. A reply cancelled there reaches its
    client as a 500 or a cut stream. An engine stopped first ends each open request with an honest
    error (503, an error event in a stream) that the client sees at once.
    """

    def __init__(self, config: uvicorn.Config,
                 before_shutdown: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.before_shutdown = before_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.before_shutdown is not None:
            self.before_shutdown()
        await super().shutdown(sockets)


class ServerHandle:
    """A server running in a background thread: ``.url``, ``.stop()``, and ``with`` support."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, url: str) -> None:
        self.server = server
        self.thread = thread
        self.url = url

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and not self.server.should_exit

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and free the port (a new server can bind it right away)."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"ServerHandle(url={self.url!r}, {state})"


def display_url(host: str, port: int) -> str:
    """The URL to show for a server bound to ``host``: a wildcard bind is reached via 127.0.0.1."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (for tests and benchmarks)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_holder(port: int) -> tuple[int, list[str]] | None:
    """``(pid, command line)`` of the process listening on ``port``, or None if psutil can't see it."""
    import psutil

    def listens(conn: Any) -> bool:
        return bool(conn.laddr) and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN

    try:
        pids = [c.pid for c in psutil.net_connections(kind="inet") if listens(c) and c.pid]
    except psutil.AccessDenied:  # macOS: system-wide listing needs root; look at our own processes
        pids = []
        for proc in psutil.process_iter():
            try:
                if any(listens(c) for c in proc.net_connections(kind="inet")):
                    pids.append(proc.pid)
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
    for pid in pids:
        try:
            return pid, psutil.Process(pid).cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            return pid, []
    return None


def _how_to_stop(pid: int, cmdline: list[str]) -> str:
    """How a learner stops the process ``pid``: the handle, the notebook's kernel, or kill."""
    if pid == os.getpid():
        return ("那就是这个 Python 进程：之前在这里（这个 notebook 里）启动的服务。用启动时返回的"
                "句柄停止它（例如 server.stop()），或者重启内核。")
    kill = f"taskkill /PID {pid} /F" if sys.platform == "win32" else f"kill {pid}"
    if any("ipykernel" in part for part in cmdline):
        return (f"那是另一个 notebook 的 Jupyter 内核：关闭那个 notebook 的内核"
                f"（Kernel > Shut Down Kernel），或者运行 {kill}。")
    return f"停止它：{kill}。"


def port_in_use_message(host: str, port: int) -> str:
    """Which process holds ``host:port``, how to stop it, or how to pick another port."""
    text = f"{host} 的端口 {port} 已被占用"
    try:
        holder = port_holder(port)
    except Exception as exc:  # psutil missing or broken: the port message matters more
        holder, text = None, f"{text}（psutil 查不了：{exc}）"
    if holder is None:
        text += ("，占用它的进程 psutil 看不到（别的用户的，或者没有权限列出；Linux 上可以试试："
                 "sudo ss -ltnp 'sport = :" + str(port) + "'）")
        advice = ""
    else:
        pid, cmdline = holder
        shown = " ".join(cmdline) or "命令行不可见"
        shown = shown if len(shown) <= 160 else shown[:157] + "..."
        text += f"，占用它的是进程 {pid}（{shown}）"
        advice = _how_to_stop(pid, cmdline)
    return f"{text}。{advice}或者换一个端口，例如 port={port + 1}。 / port {port} on {host} is already in use"


def port_taken(host: str, port: int) -> bool:
    """True if ``host:port`` cannot be bound right now."""
    with socket.socket() as sock:
        # As uvicorn does: a port left in TIME_WAIT by a stopped server is free to reuse, while
        # on Linux a live listener still makes bind fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def ensure_port_free(host: str, port: int) -> None:
    """Raise PortInUseError at once if ``host:port`` cannot be bound."""
    if port_taken(host, port):
        raise PortInUseError(port_in_use_message(host, port))


def start_uvicorn(
    app: Any,
    host: str = "127.0.0.1",
    *,
    port: int,
    health_path: str = "/health",
    timeout: float = 30.0,
    log_level: str = "warning",
    graceful_shutdown: float = 3.0,
    before_shutdown: Callable[[], None] | None = None,
) -> ServerHandle:
    """Start ``app`` in a daemon thread; return once ``health_path`` answers, or raise.

    On stop, requests still open after ``graceful_shutdown`` seconds (a long streamed reply)
    are cancelled, so ``stop()`` returns and frees the port instead of waiting for them.
    ``before_shutdown`` runs first (see ``StoppingServer``).
    """
    ensure_port_free(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=graceful_shutdown)
    server = StoppingServer(config, before_shutdown)
    # Signal handlers can only be installed in the main thread.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = display_url(host, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            _raise_start_failure(host, port)
        if server.started:
            try:
                if requests.get(url + health_path, timeout=2).status_code < 500:
                    return ServerHandle(server, thread, url)
            except requests.RequestException:
                pass
        time.sleep(0.02)
    server.should_exit = True
    raise TimeoutError(f"{url} 上的服务在 {timeout:.0f} 秒内没有回应 {health_path}。 / the server on "
                       f"{url} did not answer {health_path} within {timeout:.0f} s")


def _raise_start_failure(host: str, port: int) -> None:
    """uvicorn's thread died at start: name the port's holder if the port is taken (a race)."""
    if port_taken(host, port):
        raise PortInUseError(port_in_use_message(host, port))
    raise RuntimeError(f"{host}:{port} 上的服务启动时就退出了，原因见上面的日志。 / the server on "
                       f"{host}:{port} stopped at start; see the log above")
