"""Wire-level fakes of cloud LLM providers: small FastAPI apps on 127.0.0.1 that speak each
provider's REST format, so the real SDKs can be tested (and notebook 04 run) without a network.

``start_fake_openai(port)`` and ``start_fake_gemini(port)`` return a ``FakeServer``: ``.url``,
``.base_url`` (what to give the SDK), ``.requests`` (what arrived), ``.fail_next(...)`` and
``.delay_next(...)`` to script failures, ``.stop()`` and ``with`` support.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from helpers.background_server import ServerHandle, free_port, start_uvicorn


@dataclass
class Received:
    """One request as the fake saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    json: Any


@dataclass
class Planned:
    """A scripted answer for the next model request instead of the normal one."""

    status: int = 200
    message: str | None = None
    retry_after: float | None = None
    delay: float = 0.0


@dataclass
class FakeState:
    """What a fake received and what it will do next; shared by the app and the test."""

    api_key: str | None = None
    requests: list[Received] = field(default_factory=list)
    plan: deque[Planned] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, received: Received) -> Planned | None:
        """Store a request and pop the scripted answer for it, if any."""
        with self.lock:
            self.requests.append(received)
            return self.plan.popleft() if self.plan else None


class FakeServer:
    """A running fake: ``ServerHandle`` plus its state and scripting helpers."""

    def __init__(self, handle: ServerHandle, state: FakeState, base_url: str) -> None:
        self.handle = handle
        self.state = state
        self.url = handle.url
        self.base_url = base_url

    @property
    def requests(self) -> list[Received]:
        return self.state.requests

    @property
    def model_requests(self) -> list[Received]:
        """Requests that asked for a completion (not /health, not /v1/models)."""
        return [r for r in self.state.requests if r.method == "POST"]

    def fail_next(self, status: int, times: int = 1, message: str | None = None,
                  retry_after: float | None = None) -> None:
        """Answer the next ``times`` model requests with ``status`` (provider-shaped body)."""
        with self.state.lock:
            self.state.plan.extend(Planned(status, message, retry_after) for _ in range(times))

    def delay_next(self, seconds: float, times: int = 1) -> None:
        """Answer the next ``times`` model requests normally, but only after ``seconds``."""
        with self.state.lock:
            self.state.plan.extend(Planned(delay=seconds) for _ in range(times))

    def reset(self) -> None:
        """Forget received requests and scripted answers."""
        with self.state.lock:
            self.state.requests.clear()
            self.state.plan.clear()

    def stop(self) -> None:
        self.handle.stop()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"


def serve(app: Any, state: FakeState, port: int | None, base_path: str) -> FakeServer:
    """Run a fake app on 127.0.0.1 in a background thread."""
    handle = start_uvicorn(app, host="127.0.0.1", port=port or free_port(), health_path="/health")
    return FakeServer(handle, state, handle.url + base_path)


def answer_for(last_user: str, turns: int, system: str) -> str:
    """The fakes' deterministic answer: shows what arrived, so mapping is provable end to end."""
    return f"echo: {last_user} (turns={turns}, system={system or 'none'})"


def provider_env(openai: FakeServer | None = None, gemini: FakeServer | None = None,
                 key: str = "sk-fake-key") -> dict[str, str]:
    """Environment variables that point every cloud backend at the fakes, with dummy keys.

    For a notebook-test harness: set these in the kernel's environment before it starts, and
    ``get_chat_model("zhipu:glm-4-flash")``, ``"gemini:gemini-3.5-flash"``, ... reach the fakes.
    """
    from helpers.chat.presets import GEMINI_KEY_ENVS, PRESETS

    env: dict[str, str] = {}
    if openai is not None:
        env["OPENAI_BASE_URL"] = openai.base_url  # read by the openai SDK itself
        # Cloud presets only: the local ones (vllm, ollama, dhllm) need no key, and dhllm's key
        # variable DHLLM_API_KEY is also our own server's setting: set, it would lock notebook
        # servers behind a key the notebooks' curl calls do not send.
        for preset in PRESETS.values():
            if preset.key_required and preset.key_env:
                env[preset.base_url_env] = openai.base_url  # DHLLM_<PRESET>_BASE_URL
                env[preset.key_env] = key
    if gemini is not None:
        env["GOOGLE_GEMINI_BASE_URL"] = gemini.base_url  # read by google-genai
        env[GEMINI_KEY_ENVS[0]] = key
    return env


# A conversation with a system prompt and one earlier turn, and what every fake answers to it:
# the answer shows that system prompt, history and last message all arrived.
HISTORY = [
    {"role": "system", "content": "简短回答"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "你好吗"},
]
ECHO = answer_for("你好吗", turns=3, system="简短回答")


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers: what a
    provider behind a firewall that lets the handshake through but drops the rest looks like."""

    def __init__(self) -> None:
        import socket

        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._held: list[Any] = []  # accepted connections, kept open and never read
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:  # closed by stop()
                return
            self._held.append(connection)

    @property
    def connections(self) -> int:
        """How many connections arrived (and got no answer)."""
        return len(self._held)

    def stop(self) -> None:
        self._socket.close()
        for connection in self._held:
            connection.close()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
