"""The faults: an exception in each stage of the builtin engine, signals to dhllm's vLLM processes.

Builtin engine: a real ``BatchingEngine`` served over real HTTP (``serve_in_background``), one
of its parts (runner, KV manager, prefix cache, scheduler) wrapped so that its next call after
the fault raises once; production code has no fault hook. vLLM: ``dhllm serve --engine vllm
--replicas 2`` in its own process, as deployed; the faults are signals (``kill -9`` of a
replica's API server, of the router, of dhllm; SIGSTOP then SIGCONT of an engine core; SIGTERM
of dhllm). Every process started carries ``DHLLM_FAULT_BENCH_RUN=<run id>`` in its environment
(inherited by all it starts), and every process seen below a server is remembered (pid and start
time) while its tree is whole: vLLM renames its engine cores and workers with setproctitle, which
overwrites what ``/proc/PID/environ`` shows (psutil reads it empty), so the mark alone misses them.
What outlives a fault is found, and killed, by both.
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

from helpers.bench.fault_load import PROMPTS, FaultResult, Load, Reply, references, send, session
from helpers.bench.fault_load import under_load as run_under_load
from helpers.bench.replicas import gateway, replica_processes, running

MARK = "DHLLM_FAULT_BENCH_RUN"
MODEL = "embedded"
Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Processes: what the bench started, and what outlived a fault
# ---------------------------------------------------------------------------------------------


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline()).strip()[:60] or proc.name()}"
    except psutil.Error:
        return str(proc.pid)


def marked(run: str) -> list[psutil.Process]:
    """Live processes whose environment carries this run's mark."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(MARK) == run and _alive(proc):
                found.append(proc)
    return found


def vllm_named() -> set[int]:
    """Live ``VLLM::*`` (engine cores, workers) and ``vllm::router`` processes, anyone's."""
    found = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        text = " ".join([proc.info["name"] or "", *(proc.info["cmdline"] or [])])
        if ("VLLM::" in text or "vllm::router" in text) and _alive(proc):
            found.add(proc.pid)
    return found


def descendants(pid: int | None) -> set[int]:
    """``pid`` and every process below it (empty if it is gone)."""
    if pid is None:
        return set()
    try:
        root = psutil.Process(pid)
        return {pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.Error:
        return set()


class Baseline:
    """What ran before the bench (only processes that appear later can be left over by it), and
    every process the bench has seen below a server it started."""

    def __init__(self) -> None:
        self.vllm = vllm_named()
        self.children = descendants(os.getpid())
        self.owned: dict[int, float] = {}  # pid: create_time (a pid may be reused)

    def remember(self, root: int | None) -> None:
        """Remember ``root`` and everything below it now (call while the tree is whole)."""
        for pid in descendants(root):
            with contextlib.suppress(psutil.Error):
                self.owned[pid] = psutil.Process(pid).create_time()

    def ours(self, run: str) -> list[psutil.Process]:
        """Live processes of this run: marked, or remembered (same start time)."""
        found = {p.pid: p for p in marked(run)}
        for pid, created in self.owned.items():
            proc = _process(pid)
            with contextlib.suppress(psutil.Error):
                if proc is not None and proc.create_time() == created and _alive(proc):
                    found.setdefault(pid, proc)
        return list(found.values())


def left_over(run: str, before: Baseline, live_root: int | None = None,
              grace_s: float = 0.0, vllm: bool = False) -> list[psutil.Process]:
    """Processes that outlived what they belonged to: this run's (marked or remembered), started
    by the bench, or (``vllm``) new ``VLLM::``/``vllm::router`` ones, outside the tree of
    ``live_root`` (a server still up). Waits up to ``grace_s`` for them to exit (a parent's
    death reaches its children in seconds)."""
    deadline = time.monotonic() + grace_s
    while True:
        live = descendants(live_root)
        pids = {p.pid for p in before.ours(run)}
        pids |= descendants(os.getpid()) - before.children - {os.getpid()}
        if vllm:  # the bench holds the machine's heavy lock: new vLLM processes are its own
            pids |= vllm_named() - before.vllm
        procs = [p for p in map(_process, pids - live) if p is not None and _alive(p)]
        if not procs or time.monotonic() >= deadline:
            return procs
        time.sleep(0.5)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def kill_ours(run: str, before: Baseline, procs: Sequence[psutil.Process] | None = None) -> int:
    """SIGCONT then SIGKILL this run's processes (a stopped one must not stay stopped); only
    those of ``procs`` that are this run's, when given."""
    ours = before.ours(run)
    if procs is not None:
        pids = {p.pid for p in procs}
        ours = [p for p in ours if p.pid in pids]
    for proc in ours:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
    psutil.wait_procs(ours, timeout=10)
    return len(ours)


# ---------------------------------------------------------------------------------------------
# The builtin engine: one stage raises once
# ---------------------------------------------------------------------------------------------

# name: (part of the engine, its method). Every part is an object the engine owns; wrapping it
# on the instance touches no other engine. The last two run between the guarded stages.
STAGES: dict[str, tuple[str, str]] = {
    "scheduler (plan)": ("scheduler", "plan"),
    "prefix lookup": ("kv.prefix_cache", "lookup"),
    "prefill": ("runner", "prefill_chunk"),
    "decode": ("runner", "decode"),
    "sampling": ("runner", "pick"),
    "KV join": ("kv", "join"),
    "KV leave (keep rows)": ("kv", "keep"),
    "KV store (prefix cache)": ("kv.prefix_cache", "store"),
    "stream end (finish)": ("", "_finish"),
    "bookkeeping (gauges)": ("", "_update_gauges"),
}


class InjectedFault(RuntimeError):
    """The exception the bench injects."""


class RaiseOnce:
    """A method that raises ``InjectedFault`` on its first call after ``armed`` is set."""

    def __init__(self, real: Callable[..., Any], where: str) -> None:
        self.real, self.where = real, where
        self.armed = threading.Event()
        self.fired = 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed.is_set():
            with self._lock:
                fire = not self.fired
                self.fired += fire
            if fire:
                raise InjectedFault(f"injected by the fault bench in {self.where}")
        return self.real(*args, **kwargs)


def wrap_stage(engine: Any, part: str, method: str) -> RaiseOnce | None:
    """Replace ``engine.<part>.<method>`` on its instance; None if this engine has no such part."""
    owner = engine
    for name in filter(None, part.split(".")):
        owner = getattr(owner, name, None)
    real = getattr(owner, method, None) if owner is not None else None
    if real is None:
        return None
    wrapper = RaiseOnce(real, f"{part or 'engine'}.{method}")
    setattr(owner, method, wrapper)
    return wrapper


def _model_name(url: str) -> str:
    return session().get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


def builtin_faults(chat: Any, load: Load, log: Log, before: Baseline,
                   stages: Sequence[str] | None = None, stop: bool = True,
                   results: list[FaultResult] | None = None) -> list[FaultResult]:
    """Each stage's fault on a fresh engine and server (a dead worker must not spill over),
    then a stop of the server under load; appended to ``results`` as they come.
    ``chat``: a ``TransformersChat``."""
    from helpers.background_server import free_port
    from helpers.config import get_settings
    from helpers.server import create_app, serve_in_background
    from helpers.server.engine import create_engine

    settings = get_settings(api_key=None)

    def server(engine: Any) -> Any:
        return serve_in_background(create_app(chat, settings, engine=engine), port=free_port())

    with server(create_engine(chat, settings)) as clean:
        model = _model_name(clean.url)
        refs = references(clean.url, model, PROMPTS, load.tokens)
    results = [] if results is None else results
    for name in stages if stages is not None else list(STAGES):
        engine = create_engine(chat, settings)
        wrapper = wrap_stage(engine, *STAGES[name])
        if wrapper is None:
            results.append(FaultResult(f"exception in {name}", notes=["no such stage here"]))
            continue
        with server(engine) as handle:
            result = run_under_load(f"exception in {name}", handle.url, model, refs, load,
                                    lambda w=wrapper: w.armed.set(), log=log)
        result.notes.insert(0, f"raised once in {wrapper.where}" if wrapper.fired
                            else f"{wrapper.where} was not called after the fault: not tested")
        results.append(_with_left_over(result, "", before))
    if stop:
        results.append(_builtin_stop(server(create_engine(chat, settings)), model, refs, load,
                                     log, before))
    workers = [t for t in threading.enumerate() if t.name == "dhllm-engine"]
    if workers:
        results[-1].notes.append(f"{len(workers)} engine worker thread(s) still running")
    return results


def _builtin_stop(handle: Any, model: str, refs: Mapping[str, Reply], load: Load, log: Log,
                  before: Baseline) -> FaultResult:
    stopper = threading.Thread(target=handle.stop, kwargs={"timeout": 30}, daemon=True)

    def inject() -> list[str]:
        stopper.start()  # what Ctrl-C does to uvicorn: stop accepting, finish, shut down
        return ["the server is told to exit (uvicorn's should_exit)"]

    try:
        result = run_under_load("stop during load (builtin)", handle.url, model, refs,
                                replace(load, after_s=0.0), inject, probe=False, log=log)
    finally:
        stopper.join(35)
        handle.stop()
    if handle.thread.is_alive():
        result.notes.append("the server thread is still running 30 s after the stop")
    return _with_left_over(result, "", before)


def _with_left_over(result: FaultResult, run: str, before: Baseline,
                    live_root: int | None = None, grace_s: float = 0.0) -> FaultResult:
    """Count what this fault left over, then kill it: the next fault starts clean."""
    procs = left_over(run, before, live_root, grace_s, vllm=bool(run))
    result.left_over = len(procs)
    if procs:
        result.notes.append("left over: " + "; ".join(_describe(p) for p in procs[:4]))
        kill_ours(run, before, procs)
    return result


# ---------------------------------------------------------------------------------------------
# vLLM behind dhllm: signals under load
# ---------------------------------------------------------------------------------------------


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
                        if _alive(p) and _pgid(p.pid) == group] or [child.pid]
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
            results.append(_with_left_over(result, run, before, live_root=pid, grace_s=5))
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
    return _with_left_over(result, run, before, grace_s=15)


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
        result = _with_left_over(result, run, before, grace_s=15)
    finally:
        server.stop()
        kill_ours(run, before)
    return result
