"""Nothing we start outlives dhllm: a ``kill -9`` of it takes every child group with it, and no
child starts once stopping has begun.

The children are stand-ins for vLLM replicas, each a server that spawns a child of its own (as
vLLM's API server spawns its engine core), started the way dhllm starts them (``ChildProcess``:
its own process group). A real ``dhllm serve --engine vllm`` killed with ``kill -9`` is in
``test_vllm.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers.server.vllm import process as process_module
from helpers.server.vllm.venv import VLLMError

ROOT = Path(__file__).resolve().parents[1]

# A parent that starts two replica stand-ins (each with a child of its own), says "ready", waits.
PARENT = """
import sys, time
from helpers.background_server import free_port
from helpers.server.vllm.process import ChildProcess

SERVER = '''
import subprocess, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
engine_core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
'''


class Replica(ChildProcess):
    def command(self):
        return [sys.executable, "-c", SERVER, str(self.port)]


replicas = [Replica(free_port(), log_name="lifetime") for _ in range(2)]
for replica in replicas:
    replica.start(timeout=30)
print("ready", flush=True)
time.sleep(600)
"""


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie waiting for a reaper has stopped running)."""
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            pass
    return left


def test_a_kill_9_of_the_parent_leaves_no_descendant() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, env=env,
                              text=True)
    descendants: list[psutil.Process] = []
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        descendants = psutil.Process(parent.pid).children(recursive=True)
        # Two servers, each with its "engine core" (and the watchdog, where there is one).
        assert len(descendants) >= 4
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while alive(descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(descendants)
        assert not left, [(p.pid, p.cmdline()) for p in left]
    finally:
        parent.kill()
        parent.wait(10)
        for proc in alive(descendants):  # if it failed, the orphans are ours to end, by pid
            proc.kill()


def test_no_child_starts_once_stopping_has_begun(monkeypatch: pytest.MonkeyPatch) -> None:
    # Our own copies, so that stopping here touches no other test's processes.
    monkeypatch.setattr(process_module, "_LIVE", set())
    monkeypatch.setattr(process_module, "_STOPPING", threading.Event(), raising=False)
    process_module._stop_all()  # what the interpreter's exit runs

    class Sleeper(process_module.ChildProcess):
        def command(self) -> list[str]:
            return [sys.executable, "-c", "import time; time.sleep(600)"]

    late = Sleeper(0, log_name="late")  # a supervisor's restart, a moment too late
    late.check = lambda: None  # type: ignore[method-assign]  # port 0: nothing to check
    with pytest.raises(VLLMError, match="stopping"):
        late.start(timeout=5)
    assert not late.running and late.pid is None
