"""The replica supervisor's rules, one check at a time, without vLLM.

The replicas are real processes on 127.0.0.1 that answer ``/health`` (stand-ins for vLLM: the
real replicas behind the real vllm-router are tested in ``test_vllm_replicas.py``, slowly). The
router is a double that can refuse, as vllm-router does when a worker fails its own check, and
records what dhllm's ``/health`` said at the moment of each add.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator

import pytest

from helpers.background_server import free_port
from helpers.server.vllm.process import ChildProcess
from helpers.server.vllm.replicas import Replica, ReplicaSet
from helpers.server.vllm.venv import VLLMError

HEALTH_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


class StubReplica(ChildProcess):
    """A process that answers ``/health`` with 200: a stand-in for one vLLM server."""

    label = "stub replica"

    def __init__(self) -> None:
        super().__init__(free_port(), log_name="stub-replica")

    def command(self) -> list[str]:
        return [sys.executable, "-c", HEALTH_SERVER, str(self.port)]


class RouterDouble:
    """``add_worker``/``remove_worker`` as vllm-router takes them; ``refuse`` makes both fail."""

    policy = "cache_aware"

    def __init__(self, workers: list[str]) -> None:
        self.workers = list(workers)
        self.refuse = False
        self.set: ReplicaSet | None = None
        self.healthy_at_add: list[int] = []  # dhllm's /health count while the router adds

    def add_worker(self, url: str) -> None:
        assert self.set is not None
        self.healthy_at_add.append(self.set.health()["healthy"])
        if self.refuse:
            raise VLLMError("vllm-router /add_worker answered 503: worker failed health check")
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
