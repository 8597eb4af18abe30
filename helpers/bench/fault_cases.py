"""The builtin engine's faults, and what outlived a fault (both parts of the bench use it).

Builtin engine: a real ``BatchingEngine`` served over real HTTP (``serve_in_background``), one
of its parts (runner, KV manager, prefix cache, scheduler) wrapped so that its next call after
the fault raises once; production code has no fault hook. The vLLM faults are in
``fault_vllm``. Every process the bench starts carries ``DHLLM_FAULT_BENCH_RUN=<run id>`` in its environment
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
from dataclasses import replace
from typing import Any

import psutil

from helpers.bench.fault_load import PROMPTS, FaultResult, Load, Reply, references, session
from helpers.bench.fault_load import under_load as run_under_load

MARK = "DHLLM_FAULT_BENCH_RUN"
Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Processes: what the bench started, and what outlived a fault
# ---------------------------------------------------------------------------------------------


def alive(proc: psutil.Process) -> bool:
    """True while ``proc`` runs (a zombie has ended)."""
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
            if proc.environ().get(MARK) == run and alive(proc):
                found.append(proc)
    return found


def vllm_named() -> set[int]:
    """Live ``VLLM::*`` (engine cores, workers) and ``vllm::router`` processes, anyone's."""
    found = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        text = " ".join([proc.info["name"] or "", *(proc.info["cmdline"] or [])])
        if ("VLLM::" in text or "vllm::router" in text) and alive(proc):
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
                if proc is not None and proc.create_time() == created and alive(proc):
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
        procs = [p for p in map(_process, pids - live) if p is not None and alive(p)]
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


def count_left_over(result: FaultResult, run: str, before: Baseline,
                    live_root: int | None = None, grace_s: float = 0.0) -> FaultResult:
    """Count what this fault left over, then kill it: the next fault starts clean."""
    procs = left_over(run, before, live_root, grace_s, vllm=bool(run))
    result.left_over = len(procs)
    if procs:
        result.notes.append("left over: " + "; ".join(_describe(p) for p in procs[:4]))
        kill_ours(run, before, procs)
    return result


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
    "KV leave (retain rows)": ("kv", "retain"),
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
        results.append(count_left_over(result, "", before))
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
    return count_left_over(result, "", before)
