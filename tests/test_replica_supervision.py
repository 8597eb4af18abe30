"""The replica supervisor's rules, one check at a time, without vLLM.

The replicas are real processes on 127.0.0.1 that answer ``/health`` (stand-ins for vLLM: the
real replicas behind the real vllm-router are tested in ``test_vllm_replicas.py``, slowly). The
router is a double that can refuse, as vllm-router does when a worker fails its own check, and
records what dhllm's ``/health`` said at the moment of each add.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
import requests

from helpers.background_server import free_port
from helpers.chat import get_chat_model
from helpers.config import get_settings
from helpers.server import create_app, serve_in_background
from helpers.server.vllm import replicas as replicas_module
from helpers.server.vllm.process import ChildProcess
from helpers.server.vllm.relay import VLLMEngine
from helpers.server.vllm.replicas import Replica, ReplicaSet
from helpers.server.vllm.venv import VLLMError

HEALTH_SERVER = """
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HUNG = sys.argv[2] == "hung"  # answers GET /health, but a completion never comes (SIGSTOP)
if HUNG:  # its "engine core": a child in its process group, stopped, deaf to SIGTERM
    import os, signal, subprocess
    core = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    time.sleep(0.5)
    os.kill(core.pid, signal.SIGSTOP)

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"data": [{"id": "stub"}]}' if self.path == "/v1/models" else b"{}"
        ok = self.path in ("/health", "/liveness", "/v1/models")
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if HUNG:
            time.sleep(60)
        body = b'{"choices": [{"text": "2", "finish_reason": "length"}]}'
        self.send_response(200 if self.path == "/v1/completions" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


class StubReplica(ChildProcess):
    """A process that answers ``/health`` and 1-token completions: a stand-in for one vLLM
    server; ``hung``: its completions never come, as with a stopped engine core."""

    label = "stub replica"

    def __init__(self, hung: bool = False) -> None:
        super().__init__(free_port(), log_name="stub-replica")
        self.hung = hung

    def command(self) -> list[str]:
        return [sys.executable, "-c", HEALTH_SERVER, str(self.port), "hung" if self.hung else ""]


class RouterDouble:
    """``add_worker``/``remove_worker`` as vllm-router takes them; ``refuse`` makes both fail."""

    policy = "cache_aware"

    def __init__(self, workers: list[str]) -> None:
        self.workers = list(workers)
        self.refuse = False
        self.late = False  # the last add went on after the client gave up: "already exists"
        self.set: ReplicaSet | None = None
        self.healthy_at_add: list[int] = []  # dhllm's /health count while the router adds

    def add_worker(self, url: str) -> None:
        assert self.set is not None
        self.healthy_at_add.append(self.set.health()["healthy"])
        if self.refuse:
            raise VLLMError("vllm-router /add_worker answered 503: worker failed health check")
        if self.late:
            self.workers.append(url)  # what the timed-out call did after all
        if url in self.workers:
            raise VLLMError(f"vllm-router /add_worker answered 400: Worker {url} already exists")
        self.workers.append(url)

    def remove_worker(self, url: str) -> None:
        if self.refuse:
            raise VLLMError("vllm-router /remove_worker answered 500: busy")
        self.workers.remove(url)

    def stop(self) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[StubReplica]:
    process = StubReplica()
    yield process.start(timeout=30)
    process.stop()


def supervised(replica: Replica) -> tuple[ReplicaSet, RouterDouble]:
    router = RouterDouble([replica.url] if replica.routed else [])
    replicas = ReplicaSet([replica], router)  # type: ignore[arg-type]  # a double, not a RouterProcess
    router.set = replicas
    return replicas, router


def test_a_replica_counts_as_healthy_only_once_the_router_has_it_back(stub: StubReplica) -> None:
    replica = Replica(stub.url, healthy=False, routed=False)  # not up when the set started
    replicas, router = supervised(replica)
    router.refuse = True
    replicas._check(replica)
    assert (replica.healthy, replica.routed, router.workers) == (False, False, [])
    assert replicas.health()["healthy"] == 0  # it answers, but no request can reach it
    router.refuse = False
    replicas._check(replica)  # the refused add is tried again
    assert (replica.healthy, replica.routed, router.workers) == (True, True, [stub.url])
    assert router.healthy_at_add == [0, 0]  # never counted before the router had it
    replicas._check(replica)
    assert router.healthy_at_add == [0, 0]  # in and healthy: nothing more to do


def test_a_dead_replica_goes_out_of_the_router_and_restarts_on_time(stub: StubReplica) -> None:
    replica = Replica(stub.url, stub, healthy=True, routed=True)
    replicas, router = supervised(replica)
    stub._proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    stub._proc.wait(10)  # type: ignore[union-attr]
    router.refuse = True
    replicas._check(replica)
    assert not replica.healthy and replica.routed  # out of /health; the router refused
    restart_at = replica.restart_at
    assert restart_at > time.monotonic()  # the first backoff
    router.refuse = False
    replicas._check(replica)  # the removal is tried again; the restart is not put off
    assert (replica.routed, router.workers, replica.restart_at) == (False, [], restart_at)
    deadline = time.monotonic() + 30
    while replica.restarts == 0 and time.monotonic() < deadline:
        replicas._check(replica)
        time.sleep(0.1)
    while replica.restarting and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stub.running and replica.restarts == 1 and stub.starts == 2
    replicas._check(replica)
    assert (replica.healthy, replica.routed, router.workers) == (True, True, [stub.url])
    assert router.healthy_at_add == [0]


def test_a_replica_that_stops_answering_is_taken_out_after_three_misses() -> None:
    replica = Replica(f"http://127.0.0.1:{free_port()}", healthy=True, routed=True)  # nothing there
    replicas, router = supervised(replica)
    for misses in (1, 2):
        replicas._check(replica)
        assert replica.misses == misses and replica.healthy and router.workers == [replica.url]
    replicas._check(replica)
    assert (replica.healthy, replica.routed, router.workers) == (False, False, [])


def test_a_worker_the_router_already_has_counts_as_added(stub: StubReplica) -> None:
    replica = Replica(stub.url, healthy=False, routed=False)
    replicas, router = supervised(replica)
    router.late = True  # our earlier add timed out, and the router registered it after all
    replicas._check(replica)
    assert (replica.healthy, replica.routed, router.workers) == (True, True, [stub.url])


@pytest.fixture
def hung_stub() -> Iterator[StubReplica]:
    process = StubReplica(hung=True)
    yield process.start(timeout=30)
    process.stop()


def test_a_hung_replica_is_taken_out_after_two_misses_and_restarted_after_a_few(
        hung_stub: StubReplica, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicas_module, "PROBE_TIMEOUT_S", 0.5, raising=False)
    replica = Replica(hung_stub.url, hung_stub, healthy=True, routed=True)
    replicas, router = supervised(replica)
    replicas._check(replica)  # /health says 200, but the 1-token completion never comes
    # One miss may be a loaded machine: still routed.
    assert (replica.healthy, replica.routed, router.workers) == (True, True, [hung_stub.url])
    assert replicas.health()["hung"] == 0
    replicas._check(replica)  # a second miss in a row: out
    assert (replica.healthy, replica.routed, router.workers) == (False, False, [])
    assert replicas.health()["hung"] == 1 and hung_stub.running
    core = psutil.Process(hung_stub.pid).children()
    assert [p.status() for p in core] == [psutil.STATUS_STOPPED]
    hung_stub.hung = False  # the restart brings up one that generates
    deadline = time.monotonic() + 60
    while replica.restarts == 0 and time.monotonic() < deadline:
        if not replica.restarting:
            replicas._check(replica)
        time.sleep(0.1)
    assert replica.restarts == 1 and hung_stub.starts == 2
    # The stopped "engine core" that ignored SIGTERM went with its group (SIGKILL).
    assert not [p for p in core if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    replicas._check(replica)
    assert (replica.healthy, replica.routed, router.workers) == (True, True, [hung_stub.url])
    assert replicas.health()["hung"] == 0


class StubRouter(StubReplica):
    """A process that answers ``/liveness``: a stand-in for vllm-router, restartable."""

    label = "stub router"
    health_path = "/liveness"
    policy = "cache_aware"

    def __init__(self) -> None:
        super().__init__()
        self.worker_urls: list[str] = []
        self.added: list[str] = []

    def add_worker(self, url: str) -> None:
        self.added.append(url)

    def remove_worker(self, url: str) -> None:
        pass


def supervising_a_real_router(members: list[Replica]) -> tuple[ReplicaSet, StubRouter]:
    """A set over ``members`` whose supervisor runs (checks every 0.2 s) over a live stub router."""
    router = StubRouter().start(timeout=30)
    replicas = ReplicaSet(members, router, check_s=0.2)  # type: ignore[arg-type]
    replicas.router_state = "up"
    replicas._thread = threading.Thread(target=replicas._supervise, daemon=True)
    replicas._thread.start()
    return replicas, router


def test_a_dead_router_is_restarted_over_the_healthy_replicas(stub: StubReplica) -> None:
    up = Replica(stub.url, healthy=True, routed=True)
    down = Replica(f"http://127.0.0.1:{free_port()}", healthy=False, routed=False)
    replicas, router = supervising_a_real_router([up, down])
    try:
        router._proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while getattr(replicas, "router_restarts", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert router.running and router.starts == 2
        assert router.worker_urls == [stub.url]  # started over the replica that is up now
        # dhllm's /health says so, as the fault bench reads it.
        chat_model = get_chat_model("vllm:m", base_url=router.url + "/v1")
        engine = VLLMEngine(chat_model, router.url + "/v1", "m", process=replicas)
        app = create_app(chat_model, get_settings(api_key=None), engine=engine)
        with serve_in_background(app, port=free_port()) as handle:
            health = requests.get(handle.url + "/health", timeout=10).json()["replicas"]
        assert health["router"] == "up" and health["router_restarts"] == 1, health
        assert (health["healthy"], health["hung"], health["total"]) == (1, 0, 2)
    finally:
        replicas.stop()
    assert not router.running


def test_the_router_state_shows_while_nothing_can_restart_it(stub: StubReplica) -> None:
    down = Replica(f"http://127.0.0.1:{free_port()}", healthy=False, routed=False)
    replicas, router = supervising_a_real_router([down])
    try:
        router._proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while replicas.health().get("router") != "down" and time.monotonic() < deadline:
            time.sleep(0.1)
        # No healthy replica to route to: it stays down, and /health says so.
        assert replicas.health().get("router") == "down" and not router.running
    finally:
        replicas.stop()
