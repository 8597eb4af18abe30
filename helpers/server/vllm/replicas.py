"""N vLLM replicas behind vllm-router, supervised: a dead one is taken out, restarted, let back in.

Where the replicas run: one per GPU (``CUDA_VISIBLE_DEVICES``; with more GPUs than replicas each
replica gets an equal share and tensor parallelism over it), or on a CPU each on its own cores
(``VLLM_CPU_OMP_THREADS_BIND``), so that two replicas never fight over one core. Replicas on
other machines (``DHLLM_VLLM_URL=url1,url2``) are only watched and routed to, not started.

A supervisor thread checks every replica about once a second. A replica whose process exited
is removed from the router at once (the router's own health check would take up to a few
seconds), its process group is stopped (a ``kill -9`` of vLLM's API server leaves its engine
core running) and it is started again with exponential backoff; once it answers, it is added
back. "Answers" means it *generates*: vLLM's ``/health`` says 200 while its engine core is
hung (SIGSTOP, a deadlock; measured 2026-12-07), so a replica that has produced no token since
the last look (its ``/metrics`` counter) must finish a 1-token completion within
``PROBE_TIMEOUT_S``. One that misses ``HUNG_AFTER`` probes in a row is taken out of routing
and restarted after ``RESTART_AFTER`` misses in a row. A busy replica whose counter moves is not
probed at all.

The router is supervised too: if it exits or stops answering ``/liveness``, it is started
again over the replicas that are healthy at that moment (the others join as they recover).
``health()`` is what dhllm's ``/health`` shows, router state included.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from helpers.background_server import free_port
from helpers.server.vllm.process import VLLMProcess, cpu_range, usable_cpus
from helpers.server.vllm.router import RouterProcess
from helpers.server.vllm.venv import VLLMError

log = logging.getLogger("dhllm.server.vllm")
BACKOFF_S = (1.0, 60.0)  # first wait before a restart, and the longest (doubling in between)
# A 1-token completion on an idle replica takes well under this here. Two misses in a row (the
# second probe right after the first) put a hung replica out within issue 24's 10 s of stopping.
PROBE_TIMEOUT_S = 2.5
PROBE_EVERY_S = 3.0  # an idle replica proven to generate is probed again after this long
# Misses in a row before a replica that answers /health but not a probe is taken out of routing.
# Not one: on a loaded 2-core machine (CI) a healthy idle replica once missed a single 3 s probe.
HUNG_AFTER = 2
RESTART_AFTER = 4  # misses in a row before a replica whose process still runs is restarted
ROUTER_MISSES = 3  # /liveness misses in a row before the router counts as hung
# vLLM's Prometheus counter of generated tokens: moving means the engine generates.
_TOKENS_METRIC = re.compile(r"^vllm:generation_tokens_total(?:\{[^}]*\})? ([0-9.eE+]+)$", re.M)


def _backoff_s(failed_starts: int) -> float:
    """Seconds to wait before the next start after ``failed_starts`` failures in a row."""
    first, longest = BACKOFF_S
    return min(longest, first * 2 ** failed_starts)


@dataclass
class Replica:
    """One vLLM server: where it answers and, when we started it, its process."""

    url: str
    process: VLLMProcess | None = None  # None: it runs elsewhere; we only watch it
    healthy: bool = False
    routed: bool = True  # in the router's worker list (as far as our own calls go)
    restarts: int = 0
    failed_starts: int = 0  # in a row: how long the next backoff is
    restart_at: float = 0.0  # monotonic time of the next restart attempt
    restarting: bool = False
    misses: int = 0  # failed checks in a row (no /health, or no token)
    hung: bool = False  # answers /health but does not generate
    model: str | None = None  # its served model name (asked once of a remote replica)
    tokens: float | None = None  # its generated-tokens counter at the last look
    generated_at: float = 0.0  # monotonic time it was last seen generating


# ---------------------------------------------------------------------------------------------
# Where each replica runs
# ---------------------------------------------------------------------------------------------


def gpu_ids() -> list[str]:
    """The GPUs vLLM may use: ``CUDA_VISIBLE_DEVICES`` if set, else what ``nvidia-smi -L`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def split_evenly(items: Sequence[Any], n: int) -> list[list[Any]]:
    """``items`` cut into ``n`` contiguous, equal shares (the remainder is left unused)."""
    share = len(items) // n
    return [list(items[i * share:(i + 1) * share]) for i in range(n)]


def placements(n: int, gpus: Sequence[str] | None = None,
               cpus: Sequence[int] | None = None) -> list[tuple[dict[str, str], list[str]]]:
    """Per replica: its environment and extra vLLM arguments (GPUs if any, else CPU cores)."""
    gpus = gpu_ids() if gpus is None else list(gpus)
    if gpus:
        if n > len(gpus):
            raise VLLMError(f"{n} replicas need at least {n} GPUs; CUDA shows {len(gpus)} "
                            f"({','.join(gpus)}). Use --replicas {len(gpus)}, or run the others "
                            "on other machines (DHLLM_VLLM_URL=url1,url2,...).")
        shares = split_evenly(gpus, n)
        # More GPUs than replicas: each replica spreads its model over its share (tensor
        # parallel inside one node, where the GPUs talk over NVLink/PCIe).
        tp = ["--tensor-parallel-size", str(len(shares[0]))] if len(shares[0]) > 1 else []
        return [({"CUDA_VISIBLE_DEVICES": ",".join(share)}, tp) for share in shares]
    cpus = usable_cpus() if cpus is None else list(cpus)
    if n > len(cpus):
        raise VLLMError(f"{n} replicas need at least {n} CPU cores; this process may use "
                        f"{len(cpus)}. Use --replicas {len(cpus)} or fewer.")
    # Each replica's OpenMP threads pinned to its own cores: two replicas never share one.
    return [({"VLLM_CPU_OMP_THREADS_BIND": cpu_range(share)}, []) for share in
            split_evenly(cpus, n)]


# ---------------------------------------------------------------------------------------------
# The set: replicas, router, supervisor
# ---------------------------------------------------------------------------------------------


class ReplicaSet:
    """Replicas behind one vllm-router; ``base_url`` is the router's OpenAI API."""

    def __init__(self, replicas: Sequence[Replica], router: RouterProcess,
                 check_s: float = 1.0) -> None:
        self.replicas = list(replicas)
        self.router = router
        self.check_s = check_s
        self.start_timeout = 600.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session = requests.Session()
        self._session.trust_env = False
        self.router_state = "down"  # "up", "down" (dead or hung) or "restarting"
        self.router_restarts = 0
        self._router_misses = 0
        self._router_failed_starts = 0
        self._router_restart_at = 0.0

    @classmethod
    def local(cls, model_dir: str | Path, served_name: str, n: int, python: str | Path,
              router_python: str | Path, *, policy: str = "cache_aware", dtype: str = "float32",
              extra_args: Sequence[str] = (), env: dict[str, str] | None = None) -> ReplicaSet:
        """``n`` replicas of ``model_dir`` on this machine, one per GPU or per share of cores."""
        replicas = []
        for place_env, place_args in placements(n):
            process = VLLMProcess(model_dir, served_name, free_port(), python, dtype=dtype,
                                  extra_args=[*extra_args, *place_args],
                                  env={**(env or {}), **place_env})
            replicas.append(Replica(process.url, process, model=served_name))
        router = RouterProcess([r.url for r in replicas], free_port(), router_python,
                               policy=policy)
        return cls(replicas, router)

    @classmethod
    def remote(cls, urls: Sequence[str], router_python: str | Path, *,
               policy: str = "cache_aware") -> ReplicaSet:
        """Replicas that run elsewhere (``DHLLM_VLLM_URL=url1,url2``): only the router starts."""
        replicas = [Replica(u.rstrip("/")) for u in urls]
        return cls(replicas, RouterProcess([r.url for r in replicas], free_port(), router_python,
                                           policy=policy))

    @property
    def base_url(self) -> str:
        """The router's OpenAI API: what the relay talks to."""
        return self.router.base_url

    def start(self, timeout: float = 600.0,
              progress: Callable[[str], None] | None = None) -> ReplicaSet:
        """Start the local replicas together, then the router over those that answer."""
        self.start_timeout = timeout
        local = [r.process for r in self.replicas if r.process is not None]
        try:
            _all_at_once([lambda p=p: p.start(timeout, progress) for p in local])
            for replica in self.replicas:
                replica.healthy = self._answers(replica)
                replica.routed = replica.healthy
            up = [r.url for r in self.replicas if r.healthy]
            if not up:
                raise VLLMError("no vLLM replica answers /health: "
                                + ", ".join(r.url for r in self.replicas))
            # The router waits for every worker it is given; the others join once they answer.
            self.router.worker_urls = up
            self.router.start(timeout=60, progress=progress)
            self.router_state = "up"
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._supervise, name="vllm-replicas",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the supervisor, the router and every replica we started; safe to call twice."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self.router.stop()
        local = [r.process for r in self.replicas if r.process is not None]
        for _ in range(2):  # again once restarts in flight have seen their process go
            _all_at_once([p.stop for p in local])
            deadline = time.monotonic() + 15
            while any(r.restarting for r in self.replicas) and time.monotonic() < deadline:
                time.sleep(0.1)

    def health(self) -> dict[str, Any]:
        """Replicas in all, healthy (generating and routed to) and hung, restarts, the router."""
        return {"total": len(self.replicas), "healthy": sum(r.healthy for r in self.replicas),
                "hung": sum(r.hung for r in self.replicas),
                "restarts": sum(r.restarts for r in self.replicas), "policy": self.router.policy,
                "router": self.router_state, "router_restarts": self.router_restarts}

    # -- supervision ------------------------------------------------------------------------

    def _supervise(self) -> None:
        wait = self.check_s
        while not self._stop.wait(wait):
            self._supervise_once()
            # A first missed probe is checked again at once: a hung replica is out ~2.5 s later.
            suspect = any(r.misses == 1 and not r.hung for r in self.replicas)
            wait = 0.0 if suspect else self.check_s

    def _supervise_once(self) -> None:
        """One round: the router, then each replica."""
        try:
            self._check_router()
        except Exception:  # one bad check must never end supervision
            log.exception("checking vllm-router failed")
        for replica in self.replicas:
            try:
                self._check(replica)
            except Exception:  # one bad check must never end supervision
                log.exception("checking vLLM replica %s failed", replica.url)

    def _check(self, replica: Replica) -> None:
        process = replica.process
        if replica.restarting:
            return
        if process is not None and not process.running:  # it died: out now, back later
            if replica.healthy:
                log.warning("vLLM replica %s exited; restarting it", replica.url)
                replica.healthy = False
                replica.restart_at = time.monotonic() + self._backoff(replica)
            self._route(replica, False)  # tried again at each check while the router refuses
            if time.monotonic() >= replica.restart_at:
                replica.restarting = True
                threading.Thread(target=self._restart, args=(replica,), daemon=True).start()
            return
        ok = self._answers(replica)
        generates = ok and self._generates(replica)
        replica.misses = 0 if generates else replica.misses + 1
        if ok and not generates and replica.misses >= HUNG_AFTER:  # up, but not generating
            if not replica.hung:
                log.warning("vLLM replica %s answers /health but generates nothing (hung "
                            "engine?); taking it out of routing", replica.url)
            replica.hung = True
            replica.healthy = False
            self._route(replica, False)
        elif generates and replica.hung:
            replica.hung = False
            log.warning("vLLM replica %s generates again", replica.url)
        if (not generates and process is not None and replica.misses >= RESTART_AFTER
                and not self._stop.is_set()):
            log.warning("vLLM replica %s missed %d checks in a row; restarting it", replica.url,
                        replica.misses)
            replica.healthy = False
            self._route(replica, False)
            replica.misses = 0
            replica.restarting = True
            threading.Thread(target=self._restart, args=(replica,), daemon=True).start()
            return
        ok = generates
        if ok and not (replica.healthy and replica.routed):
            # Healthy means "takes traffic": only once the router has it back. vllm-router's
            # /add_worker probes the worker first (0.01 s if it answers; a worker that does not
            # answer holds the call past our 10 s timeout). A refused add is tried again.
            self._route(replica, True)
            if replica.routed and not replica.healthy:
                replica.healthy = True
                log.warning("vLLM replica %s is back", replica.url)
        elif replica.misses >= 3 and (replica.healthy or replica.routed):  # alive, not answering
            replica.healthy = False
            self._route(replica, False)

    def _restart(self, replica: Replica) -> None:
        """Stop what is left of its process group and start it again (in its own thread)."""
        assert replica.process is not None
        try:
            # Its engine core may have outlived the API server; a hung one may ignore SIGTERM.
            replica.process.stop(timeout=5)
            if not self._stop.is_set():
                replica.process.start(timeout=self.start_timeout)
                replica.restarts += 1
                replica.failed_starts = 0
                replica.hung = False
                replica.tokens = None
        except Exception as exc:  # noqa: BLE001 - logged; the next check schedules a retry
            replica.failed_starts += 1
            replica.restart_at = time.monotonic() + self._backoff(replica)
            log.warning("restarting vLLM replica %s failed: %s", replica.url, str(exc)[:300])
        finally:
            replica.restarting = False

    @staticmethod
    def _backoff(replica: Replica) -> float:
        return _backoff_s(replica.failed_starts)

    def _route(self, replica: Replica, on: bool) -> None:
        """Add or remove ``replica`` in the router; the router's health checks back this up."""
        if replica.routed == on:
            return
        try:
            (self.router.add_worker if on else self.router.remove_worker)(replica.url)
        except (VLLMError, requests.RequestException) as exc:
            # vllm-router's /add_worker goes on registering after our client gave up (10 s):
            # the next add says "already exists". It is in, as a removal of one not there is out.
            said = str(exc).lower()
            if ("already exists" in said) if on else ("not found" in said):
                replica.routed = on
                return
            log.warning("vllm-router refused to %s %s: %s", "add" if on else "remove",
                        replica.url, exc)
            return
        replica.routed = on

    def _check_router(self) -> None:
        """A router that exited or stopped answering is started again over the healthy replicas."""
        router = self.router
        if not hasattr(router, "running"):  # a double in tests that is not a process
            return
        if router.running:
            try:
                alive = self._session.get(router.url + router.health_path,
                                          timeout=2).status_code == 200
            except requests.RequestException:
                alive = False
            self._router_misses = 0 if alive else self._router_misses + 1
            if alive:
                self.router_state = "up"
            if self._router_misses < ROUTER_MISSES:
                return
        if self.router_state == "up":
            log.warning("vllm-router %s", "exited" if not router.running else
                        "stopped answering")
            self.router_state = "down"
            self._router_restart_at = time.monotonic()
        up = [r for r in self.replicas if r.healthy]
        if not up or time.monotonic() < self._router_restart_at or self._stop.is_set():
            return  # with no healthy replica there is nothing to route to yet
        self.router_state = "restarting"
        try:
            router.stop(timeout=5)  # what is left of its group (the launcher, a hung router)
            router.worker_urls = [r.url for r in up]
            router.start(timeout=30)
        except Exception as exc:  # noqa: BLE001 - logged; tried again after a backoff
            self._router_failed_starts += 1
            self._router_restart_at = time.monotonic() + _backoff_s(self._router_failed_starts)
            self.router_state = "down"
            log.warning("restarting vllm-router failed: %s", str(exc)[:300])
            return
        for replica in self.replicas:  # it knows the healthy ones; the others join later
            replica.routed = replica in up
        self._router_misses = self._router_failed_starts = 0
        self.router_restarts += 1
        self.router_state = "up"
        log.warning("vllm-router restarted over %d healthy replicas", len(up))

    def _generates(self, replica: Replica) -> bool:
        """Whether its engine produces tokens: its counter moved, or a 1-token completion."""
        now = time.monotonic()
        tokens = self._tokens(replica)
        moved = tokens is not None and replica.tokens is not None and tokens > replica.tokens
        replica.tokens = tokens
        if moved or (not replica.hung and replica.misses == 0
                     and now - replica.generated_at < PROBE_EVERY_S):
            if moved:
                replica.generated_at = now
            return True  # busy and generating, or proven a moment ago: no probe
        try:
            if replica.model is None:
                models = self._session.get(replica.url + "/v1/models", timeout=PROBE_TIMEOUT_S)
                replica.model = models.json()["data"][0]["id"]
            reply = self._session.post(
                replica.url + "/v1/completions", timeout=PROBE_TIMEOUT_S,
                json={"model": replica.model, "prompt": "1", "max_tokens": 1, "temperature": 0})
            ok = reply.status_code == 200
        except (requests.RequestException, ValueError, KeyError, IndexError):
            ok = False
        if ok:
            replica.generated_at = time.monotonic()
            replica.tokens = self._tokens(replica)  # the probe's own token is not traffic
        return ok

    def _tokens(self, replica: Replica) -> float | None:
        """Its generated-tokens counter (summed over engines), or None without one."""
        try:
            reply = self._session.get(replica.url + "/metrics", timeout=2)
        except requests.RequestException:
            return None
        found = _TOKENS_METRIC.findall(reply.text) if reply.status_code == 200 else []
        return sum(float(v) for v in found) if found else None

    def _answers(self, replica: Replica) -> bool:
        try:
            return self._session.get(replica.url + "/health", timeout=3).status_code == 200
        except requests.RequestException:
            return False


def _all_at_once(calls: Sequence[Callable[[], Any]]) -> None:
    """Run ``calls`` in threads together; raise the first error once all are done.

    Plain threads, not an executor: ``stop()`` also runs from atexit hooks, where an executor
    refuses new work ("cannot schedule new futures after interpreter shutdown").
    """
    errors: list[BaseException] = []

    def run(call: Callable[[], Any]) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
