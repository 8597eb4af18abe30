"""The vLLM faults: signals under load to ``dhllm serve --engine vllm --replicas 2``.

dhllm runs in its own process, as deployed (``--enforce-eager``, 1 GiB of KV per replica); the
faults are ``kill -9`` of a replica's API server, SIGSTOP then SIGCONT of an engine core,
``kill -9`` of the router and of dhllm, and SIGTERM of a second dhllm. ``/health`` is watched
from the fault on: when it counted a replica out, when all were back, restarts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import psutil
import requests

from helpers.bench.fault_cases import (
    MARK,
    Baseline,
    Log,
    alive,
    count_left_over,
    descendants,
    kill_ours,
)
from helpers.bench.fault_load import PROMPTS, FaultResult, Load, Reply, references, send, session
from helpers.bench.fault_load import under_load as run_under_load
from helpers.bench.replicas import gateway, replica_processes, running

MODEL = "embedded"


def vllm_env(run: str) -> dict[str, str]:
    """``dhllm serve --engine vllm`` as the replica tests start it: no compile, 1 GiB of KV."""
    return {"DHLLM_VLLM_KVCACHE_GB": "1", "DHLLM_API_KEY": "",
            "DHLLM_VLLM_ARGS": "--enforce-eager", MARK: run}


class HealthWatch:
    """``/health``'s replica counts every 0.5 s from the fault on: when one went out, came back."""

    def __init__(self, url: str) -> None:
        self.url, self.since = url, time.monotonic()
        self.samples: list[tuple[float, dict[str, Any] | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="fault-health")
        self.first = self._get()

    def around(self, inject: Callable[[], list[str]]) -> Callable[[], list[str]]:
        """``inject``, with the watch started at the moment of the fault."""

        def run() -> list[str]:
            self.since = time.monotonic()
            self._thread.start()
            return inject()

        return run

    def _get(self) -> dict[str, Any] | None:
        try:
            return session().get(self.url + "/health", timeout=3).json().get("replicas")
        except (requests.RequestException, ValueError):
            return None

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.samples.append((time.monotonic() - self.since, self._get()))

    def out_at(self) -> float | None:
        """Seconds until ``/health`` first counted a replica out (or did not answer)."""
        return next((t for t, h in self.samples if h is None or h["healthy"] < h["total"]), None)

    def wait_back(self, limit_s: float) -> float | None:
        """Wait until every replica counts healthy again after being out; seconds since the fault."""
        deadline = self.since + limit_s
        if self.out_at() is None:  # never out (the load ran for tens of seconds): nothing to wait
            return None
        while time.monotonic() < deadline:
            out = self.out_at()
            if out is not None and any(t > out and h and h["healthy"] == h["total"]
                                       for t, h in self.samples):
                return next(t for t, h in self.samples
                            if t > out and h and h["healthy"] == h["total"])
            time.sleep(0.5)
        return None

    def stop(self) -> list[str]:
        """Notes: out after, back after, restarts, what ``/health`` says at the end."""
        self._stop.set()
        if self._thread.ident is not None:  # started: the fault was injected
            self._thread.join(5)
        last = self.samples[-1][1] if self.samples else None
        out = self.out_at()
        notes = [f"/health counted a replica out after {out:.1f} s" if out is not None
                 else f"/health never counted a replica out ({_health(last)} throughout)"]
        if last is not None and self.first is not None:
            notes.append(f"/health at the end: {_health(last)}, restarts "
                         f"+{last['restarts'] - self.first['restarts']}")
        return notes


def _health(h: dict[str, Any] | None) -> str:
    return "no answer" if h is None else f"healthy {h['healthy']}/{h['total']}"


def _replica_under_load(gateway_pid: int) -> tuple[int, int]:
    """``(port, API server pid)`` of the replica running the most requests now."""
    ports = replica_processes(gateway_pid)
    busy = {}
    for port in ports:
        with contextlib.suppress(requests.RequestException):
            busy[port] = running(port)
    port = max(ports, key=lambda p: busy.get(p, 0.0))
    return port, ports[port]


def _engine_core(api_pid: int) -> int:
    for child in psutil.Process(api_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in " ".join([child.name(), *child.cmdline()]):
                return child.pid
    raise RuntimeError(f"no VLLM::EngineCore below the vLLM server {api_pid}")


def _router_group(gateway_pid: int) -> list[int]:
    """The router's processes: ``vllm::router`` and everything in its process group."""
    for child in psutil.Process(gateway_pid).children():
        with contextlib.suppress(psutil.Error):
            text = " ".join([child.name(), *child.cmdline()])
            if "vllm::router" in text or "vllm_router" in text:
                group = os.getpgid(child.pid)
                return [p.pid for p in psutil.process_iter()
                        if alive(p) and _pgid(p.pid) == group] or [child.pid]
    raise RuntimeError("no vllm::router below dhllm")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _names(pids: set[int]) -> list[str]:
    names = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            names.append(" ".join([proc.name(), *proc.cmdline()]))
    return names


def _kill(pids: Sequence[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def warm_up(url: str, n: int = 8, tokens: int = 16) -> None:
    """A few concurrent requests: vLLM's first batches are slow; the faults meet a warm server."""
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda i: send(url, MODEL, PROMPTS[i % len(PROMPTS)], tokens,
                                     bool(i % 2), 120), range(n)))


def vllm_faults(run: str, load: Load, log: Log, before: Baseline, hold_s: float = 45.0,
                back_s: float = 240.0,
                results: list[FaultResult] | None = None) -> list[FaultResult]:
    """Four faults on one ``dhllm serve --engine vllm --replicas 2``, a stop on a second one;
    appended to ``results`` as they come."""
    results = [] if results is None else results
    server = gateway(2, vllm_env(run), log)
    try:
        warm_up(server.url)
        refs = references(server.url, MODEL, PROMPTS, load.tokens)
        pid = server.proc.pid
        timers: list[threading.Timer] = []

        def kill_replica() -> list[str]:
            port, api = _replica_under_load(pid)
            _kill([api])
            return [f"kill -9 of the vLLM API server on port {port}"]

        def sigstop() -> list[str]:
            port, api = _replica_under_load(pid)
            core = _engine_core(api)
            _kill([core], signal.SIGSTOP)
            timer = threading.Timer(hold_s, _kill, args=([core], signal.SIGCONT))
            timer.daemon = True
            timer.start()
            timers.append(timer)
            stopped.append(core)
            return [f"SIGSTOP of VLLM::EngineCore (replica on port {port}), SIGCONT after "
                    f"{hold_s:.0f} s"]

        def kill_router() -> list[str]:
            pids = _router_group(pid)
            _kill(pids)
            return [f"kill -9 of vllm::router ({len(pids)} process(es) in its group)"]

        stopped: list[int] = []
        for name, inject, longer in (("kill -9 of a replica", kill_replica, False),
                                     ("SIGSTOP of an engine core", sigstop, True),
                                     ("kill -9 of the router", kill_router, False)):
            watch = HealthWatch(server.url)
            # A hung core holds requests for the client's whole timeout: send for longer.
            fault_load = replace(load, after_s=12.0, recover_s=90.0) if longer else load
            back = None
            before.remember(pid)  # restarted replicas are new processes
            try:
                result = run_under_load(name, server.url, MODEL, refs, fault_load,
                                        watch.around(inject), log=log)
                for timer in timers:  # the engine core stays stopped for the whole hold
                    timer.join(hold_s + 5)
                back = watch.wait_back(back_s)
            finally:
                _kill(stopped, signal.SIGCONT)
                notes = watch.stop()
            result.notes += notes
            if back is not None:
                result.notes.append(f"/health all healthy again after {back:.0f} s")
            results.append(count_left_over(result, run, before, live_root=pid, grace_s=5))
        results.append(_kill_dhllm(server, refs, load, run, log, before))
    finally:
        server.stop()
        kill_ours(run, before)
    results.append(_vllm_stop(run, load, log, before))
    return results


def _kill_dhllm(server: Any, refs: Mapping[str, Reply], load: Load, run: str, log: Log,
                before: Baseline) -> FaultResult:
    tree = descendants(server.proc.pid)
    before.remember(server.proc.pid)
    router = any("vllm::router" in name for name in _names(tree))

    def inject() -> list[str]:
        _kill([server.proc.pid])
        return [f"kill -9 of dhllm ({len(tree) - 1} processes below it, the router "
                f"{'among them' if router else 'not among them'})"]

    # Requests sent after the kill are refused (an error they see): only those in flight count.
    result = run_under_load("kill -9 of dhllm", server.url, MODEL, refs,
                            replace(load, after_s=0.0), inject, probe=False, log=log)
    with contextlib.suppress(Exception):
        server.proc.wait(10)
    result.served_again = "n/a (nothing restarts dhllm)"
    return count_left_over(result, run, before, grace_s=15)


def _vllm_stop(run: str, load: Load, log: Log, before: Baseline) -> FaultResult:
    """SIGTERM (systemd's, docker's stop) of a second ``dhllm serve`` while requests run."""
    server = gateway(2, vllm_env(run), log)
    try:
        warm_up(server.url)
        refs = references(server.url, MODEL, PROMPTS, load.tokens)

        def inject() -> list[str]:
            before.remember(server.proc.pid)
            server.proc.send_signal(signal.SIGTERM)
            return ["SIGTERM to dhllm"]

        result = run_under_load("stop during load (vLLM)", server.url, MODEL, refs,
                                replace(load, after_s=0.0), inject, probe=False, log=log)
        try:
            server.proc.wait(60)
        except Exception:  # noqa: BLE001 - reported, then killed below
            result.notes.append("dhllm still running 60 s after SIGTERM")
        result = count_left_over(result, run, before, grace_s=15)
    finally:
        server.stop()
        kill_ours(run, before)
    return result
