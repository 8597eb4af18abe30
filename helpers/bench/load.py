"""Client load generation: streamed OpenAI chat requests from threads, like real chat clients."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

from helpers.bench.persona import PERSONA, TURNS, conversation
from helpers.client import iter_sse_data
from helpers.speech import SentenceSplitter

PROMPT = "Tell me a short story about a brave little robot."
# What every ``POST /`` of the chapter samples with (helpers.server.protocol's CHAPTER_*), sent
# to /v1 as the extra fields that vLLM and our server both take.
CHAPTER_SAMPLING = {"top_k": 20, "repetition_penalty": 1.15}

@dataclass
class Reply:
    """One streamed reply: its text and when each piece arrived (seconds after sending)."""

    text: str = ""
    tokens: int = 0
    stamps: list[float] = field(default_factory=list)
    first_sentence: float | None = None  # when a TTS client would have its first sentence
    splitter: SentenceSplitter = field(default_factory=SentenceSplitter, repr=False)
    full: float = 0.0

    @property
    def ttft(self) -> float:
        return self.stamps[0] if self.stamps else self.full


def stream_chat(url: str, model: str, messages: Sequence[dict[str, str]], tokens: int,
                temperature: float, session: requests.Session,
                on_piece: Callable[[Reply], None] | None = None,
                sampling: dict[str, Any] | None = None) -> Reply:
    """Send one streamed chat request; time every piece and the first whole sentence.

    ``sampling``: more fields of the request body (``CHAPTER_SAMPLING``, say).
    """
    body = {"model": model, "messages": list(messages), "max_tokens": tokens,
            "temperature": temperature, "stream": True, "stream_options": {"include_usage": True},
            **(sampling or {})}
    reply, usage, started = Reply(), None, time.perf_counter()
    with session.post(f"{url}/v1/chat/completions", json=body, stream=True,
                      timeout=600) as response:
        response.raise_for_status()
        for data in iter_sse_data(response.iter_lines()):
            if not data.startswith("{"):
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    _add_piece(reply, piece, time.perf_counter() - started, on_piece)
    reply.full = time.perf_counter() - started
    reply.tokens = usage if usage is not None else len(reply.stamps)
    return reply


def _add_piece(reply: Reply, piece: str, at: float, on_piece: Callable[[Reply], None] | None) -> None:
    reply.text += piece
    reply.stamps.append(at)
    if reply.splitter.push(piece) and reply.first_sentence is None:
        reply.first_sentence = at
    if on_piece is not None:
        on_piece(reply)


@dataclass
class LoadResult:
    """One load run: ``clients`` concurrent clients, ``rounds`` requests each."""

    clients: int
    tokens: int
    seconds: float
    ttft_p50: float
    full_p50: float
    first_sentence_p50: float = 0.0
    errors: int = 0
    full_p95: float = 0.0
    fulls: list[float] = field(default_factory=list)  # each request's full reply time (s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def run_load(url: str, clients: int, rounds: int = 1, tokens: int = 48,
             temperature: float = 0.7, model: str = "model",
             sampling: dict[str, Any] | None = None) -> LoadResult:
    """``clients`` threads each send ``rounds`` requests one after another; all start together."""
    barrier = threading.Barrier(clients)
    messages = [{"role": "user", "content": PROMPT}]

    def client(_: int) -> list[Reply | None]:
        session = requests.Session()
        barrier.wait()
        out: list[Reply | None] = []
        for _round in range(rounds):
            try:
                out.append(stream_chat(url, model, messages, tokens, temperature, session,
                                       sampling=sampling))
            except requests.RequestException:
                out.append(None)
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    seconds = time.perf_counter() - started
    ok = [r for r in results if r is not None]
    sentences = [r.first_sentence for r in ok if r.first_sentence is not None]
    fulls = [r.full for r in ok]
    return LoadResult(
        clients=clients, tokens=sum(r.tokens for r in ok), seconds=seconds,
        ttft_p50=_median([r.ttft for r in ok]), full_p50=_median(fulls),
        first_sentence_p50=_median(sentences), errors=len(results) - len(ok),
        full_p95=percentile(fulls, 95), fulls=fulls,
    )


def merge_loads(runs: Sequence[LoadResult]) -> dict[str, Any]:
    """Runs of one load (one per interleaved round) as one: tokens over seconds, pooled latencies."""
    fulls = [f for r in runs for f in r.fulls]
    tokens, seconds = sum(r.tokens for r in runs), sum(r.seconds for r in runs)
    return {"clients": runs[0].clients, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "rounds_tokens_per_s": [r.tokens_per_s for r in runs],
            "ttft_p50": _median([r.ttft_p50 for r in runs]),
            "first_sentence_p50": _median([r.first_sentence_p50 for r in runs]),
            "full_p50": _median(fulls), "full_p95": percentile(fulls, 95),
            "errors": sum(r.errors for r in runs)}


def persona_ttft(url: str, model: str, turns: int = len(TURNS), tokens: int = 48) -> dict[str, Any]:
    """TTFT of each turn of the persona conversation (greedy, history with the real answers)."""
    session, answers, ttft = requests.Session(), [], []
    for turn in range(min(turns, len(TURNS))):
        reply = stream_chat(url, model, conversation(answers, turn), tokens, 0.0, session)
        answers.append(reply.text)
        ttft.append(reply.ttft)
    return {"ttft": ttft, "first": ttft[0], "last": ttft[-1], "turns": len(ttft)}


def long_prompt(chars: int = 6000) -> list[dict[str, str]]:
    """A prompt of ~``chars`` / 4 tokens (~1500 by default) that no server has seen before."""
    text = (PERSONA + "\n\n") * (chars // len(PERSONA) + 1)
    return [{"role": "system", "content": "You summarise texts in one sentence."},
            {"role": "user", "content": f"Summarise this ({time.time_ns()}):\n\n{text[:chars]}"}]


def pause_during_long_prompt(url: str, model: str, streams: int = 3, tokens: int = 128,
                             long_chars: int = 6000) -> dict[str, Any]:
    """Longest pause of running streams while a long prompt arrives, and their median gap."""
    replies: list[Reply] = [Reply() for _ in range(streams)]
    warm = threading.Barrier(streams + 1)

    def on_piece(reply: Reply) -> None:
        if len(reply.stamps) == 8:  # well into decoding: the long prompt may come
            warm.wait()

    def run(i: int) -> None:
        started = time.perf_counter()
        reply = stream_chat(url, model, [{"role": "user", "content": f"{PROMPT} ({i})"}], tokens,
                            0.0, requests.Session(), on_piece)
        replies[i] = reply
        replies[i].stamps = [started + s for s in reply.stamps]  # absolute, for the window
        if len(reply.stamps) < 8:
            warm.abort()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    warm.wait(timeout=600)
    t0 = time.perf_counter()
    # A few tokens, not one: the window then also covers the new row joining the batch.
    arrival = stream_chat(url, model, long_prompt(long_chars), 8, 0.0, requests.Session())
    for thread in threads:
        thread.join()
    return {**_pauses([r.stamps for r in replies], t0, t0 + arrival.full),
            "long_prompt_ttft": arrival.ttft}


def _pauses(stamps: list[list[float]], t0: float, t1: float) -> dict[str, Any]:
    """Median gap before ``t0``; the longest gap overlapping [t0, t1] (the arrival's reply)."""
    before = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if b < t0]
    during = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if b >= t0 and a <= t1]
    median = _median(before)
    longest = max(during, default=0.0)
    return {"median_gap": median, "longest_pause": longest,
            "ratio": longest / median if median else 0.0}


def health_latency_during(url: str, work: Callable[[], Any]) -> tuple[Any, list[float]]:
    """Run ``work()`` while polling ``/health`` every 50 ms; return its result and latencies."""
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        session = requests.Session()
        while not done.is_set():
            started = time.perf_counter()
            try:
                session.get(f"{url}/health", timeout=10)
                latencies.append(time.perf_counter() - started)
            except requests.RequestException:
                pass
            done.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        result = work()
    finally:
        done.set()
        poller.join()
    return result, latencies


def percentile(values: Sequence[float], q: int) -> float:
    """The ``q``-th percentile (1..99) by ``statistics.quantiles``; 0 without values."""
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0
