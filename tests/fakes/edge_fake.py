"""A local stand-in for Edge TTS's websocket service, speaking the protocol ``edge-tts`` 7.3 uses.

The client sends ``speech.config`` then an SSML request (text frames: headers, a blank line,
the body); the service answers ``turn.start``, binary ``audio`` frames (a 2-byte big-endian
header length, headers, then MP3 bytes) and ``turn.end``. Here the "voice" is a tone, 0.1 s
per character, so tests can check that the text arrived and that the MP3 is decoded.
``edge_tts.communicate.WSS_URL`` is the one thing to point at it (a module constant).
"""

from __future__ import annotations

import asyncio
import io
import re
import threading
from typing import Any

import numpy as np
import soundfile
from aiohttp import WSMsgType, web

RATE = 24000


def tone_mp3(seconds: float) -> bytes:
    """A 440 Hz tone as MP3 (Edge's own output is MP3 at 24 kHz)."""
    t = np.arange(int(RATE * seconds)) / RATE
    out = io.BytesIO()
    soundfile.write(out, (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16), RATE,
                    format="MP3")
    return out.getvalue()


def audio_frame(mp3: bytes) -> bytes:
    # edge-tts reads the headers from data[:n] (n = the first 2 bytes) and the audio from
    # data[n + 2:], so the header block ends with a CRLF that n does not count.
    headers = b"X-RequestId:fake\r\nContent-Type:audio/mpeg\r\nPath:audio\r\n"
    return len(headers).to_bytes(2, "big") + headers + mp3


def text_frame(path: str) -> str:
    return f"X-RequestId:fake\r\nContent-Type:application/json\r\nPath:{path}\r\n\r\n{{}}"


class EdgeFake:
    """Run with ``with EdgeFake() as fake:``; ``fake.url`` replaces edge-tts's WSS_URL."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []  # voice and text of each SSML request
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT or "Path:ssml" not in msg.data:
                continue
            voice = re.search(r"<voice name='([^']+)'>", msg.data)
            text = re.search(r"<prosody[^>]*>(.*)</prosody>", msg.data, re.S)
            spoken = text.group(1) if text else ""
            self.requests.append({"voice": voice.group(1) if voice else "", "text": spoken})
            await ws.send_str(text_frame("turn.start"))
            mp3 = tone_mp3(0.1 * max(len(spoken), 1))
            for i in range(0, len(mp3), 4096):  # several frames, as the real service sends
                await ws.send_bytes(audio_frame(mp3[i:i + 4096]))
            await ws.send_str(text_frame("turn.end"))
        return ws

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/edge/v1", self._ws)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._started.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/edge/v1?TrustedClientToken=fake"

    def __enter__(self) -> EdgeFake:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the Edge fake did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
