"""Time to first audio: from the question being sent to the digital human's first audio ready.

Two ways, measured on the same streamed request so they see the same load:
- (a) the chapter's way: wait for the whole answer, then speak all of it;
- (b) cut the stream into sentences and speak the first one as soon as it is complete.

The voice runs in the client (espeak-ng, offline), not through the server's
``/v1/audio/speech``, so that every peer (vLLM, transformers serve) is measured the same way.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from helpers.bench.load import PROMPT, Reply, _median, stream_chat
from helpers.speech import EspeakVoice, SentenceSplitter, Voice


def _one_conversation(url: str, model: str, tokens: int, temperature: float, voice: Voice,
                      barrier: threading.Barrier) -> tuple[float, float]:
    """(a, b) in seconds for one question."""
    session, splitter, seen = requests.Session(), SentenceSplitter(), [0]
    first: list[float] = []
    barrier.wait()
    started = time.perf_counter()

    def on_piece(reply: Reply) -> None:
        done = splitter.push(reply.text[seen[0]:])
        seen[0] = len(reply.text)
        if done and not first:
            voice.synthesize(done[0].strip())
            first.append(time.perf_counter() - started)

    reply = stream_chat(url, model, [{"role": "user", "content": PROMPT}], tokens, temperature,
                        session, on_piece)
    if not first:  # no sentence ended before the answer did: the whole answer is the first one
        voice.synthesize(reply.text.strip() or "。")
        first.append(time.perf_counter() - started)
    t0 = time.perf_counter()
    voice.synthesize(reply.text.strip() or "。")
    whole = reply.full + time.perf_counter() - t0
    return whole, first[0]


def first_audio(url: str, model: str, clients: int = 1, tokens: int = 48,
                temperature: float = 0.7, voice: Voice | None = None) -> dict[str, Any]:
    """Medians of (a) whole answer then TTS and (b) streamed sentences, ``clients`` at once."""
    voice = voice or EspeakVoice()
    barrier = threading.Barrier(clients)
    with ThreadPoolExecutor(clients) as pool:
        pairs = list(pool.map(lambda _: _one_conversation(url, model, tokens, temperature, voice,
                                                          barrier), range(clients)))
    whole, streamed = [a for a, _ in pairs], [b for _, b in pairs]
    a, b = _median(whole), _median(streamed)
    return {"clients": clients, "whole_p50": a, "streamed_p50": b,
            "ratio": b / a if a else 0.0, "whole": whole, "streamed": streamed}


def first_audio_table(report: Any) -> str:
    """The "first audio" figures of every server in the run, as a Markdown table."""
    rows = [(key, r["first_audio"]) for key, r in report.results.items()
            if isinstance(r, dict) and "first_audio" in r]
    if not rows:
        return ""
    counts = sorted({int(n) for _, fa in rows for n in fa}, key=int)
    head = " | ".join(f"first audio, {n} conv.: whole -> TTS / streamed" for n in counts)
    lines = [f"| server | {head} |", "|---" * (len(counts) + 1) + "|"]
    for key, fa in rows:
        cells = [f"{fa[str(n)]['whole_p50'] * 1000:.0f} / {fa[str(n)]['streamed_p50'] * 1000:.0f}"
                 f" ms ({fa[str(n)]['ratio']:.2f}x)" if str(n) in fa else "-" for n in counts]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
