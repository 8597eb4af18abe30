"""vllm-router in front of vLLM replicas: one OpenAI endpoint that spreads requests over them.

``vllm-router`` (PyPI, a Rust binary in a manylinux wheel) routes cache-aware by default: a
request goes to the replica whose radix tree holds the longest prefix of its text, so a
conversation stays where its KV cache is warm, unless the load is too uneven. It retries a
request that fails to connect, health-checks its workers and takes out those that fail. We
start it as ``python -m vllm_router.launch_router`` (the launcher renames itself
``vllm::router``) in a process group of its own and stop the group: SIGTERM to the launcher's
pid alone has left the Rust router running as an orphan.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

from helpers.background_server import free_port
from helpers.server.vllm.process import ChildProcess
from helpers.server.vllm.venv import VLLMError, has_module, python_in

POLICIES = ("cache_aware", "round_robin", "power_of_two", "consistent_hash", "random")
INSTALL_HINT = ("vllm-router was not found: `make vllm` installs it beside vLLM (or "
                "`pip install vllm-router==0.1.17` in vLLM's venv); or point "
                "DHLLM_VLLM_ROUTER_PYTHON at a python that has it.")


def find_router_python(setting: str | None = None, beside: Path | None = None) -> Path | None:
    """A Python with ``vllm_router``: ``setting``, then vLLM's own (``beside``), then PATH's."""
    if setting:
        python = python_in(Path(setting).expanduser())
        if not has_module(python, "vllm_router"):
            raise VLLMError(f"DHLLM_VLLM_ROUTER_PYTHON={setting!r}: {python} has no vllm_router")
        return python
    candidates = [beside] if beside is not None else []
    script = shutil.which("vllm-router")
    if script:
        candidates.append(Path(script).with_name("python"))
    return next((c for c in candidates if has_module(c, "vllm_router")), None)


class RouterProcess(ChildProcess):
    """``vllm-router`` over ``worker_urls``; ``add_worker`` / ``remove_worker`` change the set."""

    label = "vllm-router"
    health_path = "/liveness"  # its /health answers 503 while any worker is down

    def __init__(self, worker_urls: Sequence[str], port: int, python: str | Path, *,
                 policy: str = "cache_aware", host: str = "127.0.0.1",
                 health_interval_s: int = 2, retries: int = 3,
                 env: Mapping[str, str] | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if not worker_urls:
            raise ValueError("vllm-router needs at least one worker URL")
        super().__init__(port, host=host, env=env, log_name="vllm-router")
        self.worker_urls = [u.rstrip("/") for u in worker_urls]
        self.python = Path(python)
        self.policy = policy
        self.health_interval_s = health_interval_s
        self.retries = retries
        self.metrics_port = free_port()
        self._session = requests.Session()
        self._session.trust_env = False  # loopback calls must not go through a proxy

    @property
    def base_url(self) -> str:
        """What an OpenAI client (or our relay) takes as ``base_url``."""
        return self.url + "/v1"

    def command(self) -> list[str]:
        """The argv that start() runs."""
        return [
            str(self.python), "-m", "vllm_router.launch_router",
            "--worker-urls", *self.worker_urls,
            "--policy", self.policy,
            "--host", self.host, "--port", str(self.port),
            # Its defaults check every 60 s and need 3 failures: a dead replica would keep
            # receiving requests for minutes. One failed check takes it out, one good one back.
            "--health-check-interval-secs", str(self.health_interval_s),
            "--health-failure-threshold", "1", "--health-success-threshold", "1",
            "--health-check-timeout-secs", "5",
            # A refused connection is retried on another worker; "1" means no retry at all.
            "--retry-max-retries", str(max(1, self.retries + 1)),
            "--retry-initial-backoff-ms", "100", "--retry-max-backoff-ms", "2000",
            # Its Prometheus exporter takes a fixed port by default: a second router failed
            # to start ("Address already in use").
            "--prometheus-host", self.host, "--prometheus-port", str(self.metrics_port),
        ]  # fmt: skip

    def workers(self) -> list[dict[str, Any]]:
        """The router's view: ``[{"url": ..., "is_healthy": ..., "load": ...}, ...]``."""
        return self._call("GET", "/workers").json()["workers"]

    def add_worker(self, url: str) -> None:
        """Route to ``url`` again (a replica that came back)."""
        self._call("POST", "/add_worker", url)

    def remove_worker(self, url: str) -> None:
        """Stop routing to ``url`` (a replica that died), before the next health check notices."""
        self._call("POST", "/remove_worker", url)

    def _call(self, method: str, path: str, url: str | None = None) -> requests.Response:
        params = {"url": url.rstrip("/")} if url else None
        response = self._session.request(method, self.url + path, params=params, timeout=10)
        if response.status_code >= 400:
            raise VLLMError(f"vllm-router {path} answered {response.status_code}: "
                            f"{response.text[:200]}")
        return response
