"""Edge TTS (``edge-tts``): Microsoft Edge's online voices, Linly-Talker's default TTS.

Natural Chinese voices such as zh-CN-XiaoxiaoNeural; needs internet. The service answers in MP3,
which ``Audio.from_mp3`` decodes to PCM.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from helpers.speech.audio import Audio

DEFAULT_VOICE = "zh-CN-XiaoxiaoNeural"
HOST = "speech.platform.bing.com"
# Edge's voice names: language-REGION[-variant]-NameNeural, e.g. zh-CN-XiaoxiaoNeural.
EDGE_NAME = re.compile(r"^[a-z]{2,3}-[A-Z]{2}(-[A-Za-z]+)?-[A-Za-z]+Neural$")
T = TypeVar("T")


class SpeechUnavailable(RuntimeError):
    """An online voice cannot be reached; ``status_code`` 503 for servers."""

    status_code = 503


def is_edge_voice(name: str) -> bool:
    """Whether ``name`` is shaped like an Edge voice name."""
    return bool(EDGE_NAME.match(name))


_reachable: tuple[float, bool] | None = None


def edge_reachable(timeout: float = 1.5, cache_s: float = 60.0) -> bool:
    """Whether Edge's service answers a TCP connection (remembered for ``cache_s`` seconds).

    Offline (``DHLLM_OFFLINE``, as the hub probes honour it) nothing is probed: False. Read from
    the environment directly because helpers.speech imports nothing from the package.
    """
    global _reachable
    if os.environ.get("DHLLM_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    now = time.monotonic()
    if _reachable is None or now - _reachable[0] > cache_s:
        try:
            socket.create_connection((HOST, 443), timeout=timeout).close()
            _reachable = (now, True)
        except OSError:
            _reachable = (now, False)
    return _reachable[1]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to the end from sync code, also where a loop already runs (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class EdgeVoice:
    """One Edge TTS voice, e.g. ``EdgeVoice("zh-CN-YunxiNeural")``."""

    backend = "edge"

    def __init__(self, voice: str = DEFAULT_VOICE, timeout_s: int = 10) -> None:
        if not is_edge_voice(voice):
            raise ValueError(f"{voice!r} is not an Edge voice name (like {DEFAULT_VOICE})")
        self.voice, self.timeout_s = voice, timeout_s

    async def asynthesize(self, text: str, speed: float = 1.0) -> Audio:
        """Speak ``text`` through the service; ``SpeechUnavailable`` when it cannot be reached."""
        import aiohttp
        import edge_tts
        from edge_tts.exceptions import EdgeTTSException

        rate = f"{round((speed - 1) * 100):+d}%"
        communicate = edge_tts.Communicate(text, self.voice, rate=rate,
                                           connect_timeout=self.timeout_s)
        mp3 = bytearray()
        try:
            async for chunk in communicate.stream():
                if chunk["type"] == "audio":
                    mp3 += chunk["data"]
        except (TimeoutError, aiohttp.ClientError, OSError, EdgeTTSException) as exc:
            raise SpeechUnavailable(f"Edge TTS ({HOST}) cannot be reached or failed: "
                                    f"{type(exc).__name__}: {exc}. It needs internet; "
                                    "use the offline voice (model 'espeak').") from exc
        return Audio.from_mp3(bytes(mp3))

    def synthesize(self, text: str, speed: float = 1.0) -> Audio:
        """The same, from sync code."""
        return _run(self.asynthesize(text, speed))

    def __repr__(self) -> str:
        return f"EdgeVoice({self.voice!r})"
