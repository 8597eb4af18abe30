"""Load during a fault, counted from the client's side: every request ends in one column.

A request is **whole** when it ends normally and is as long as an undisturbed greedy answer to
the same prompt (taken before the fault); an **error** when the client can see one (status
>= 400, an error event in the stream, a refused or reset connection); **short** when it ends
looking normal but is not whole (finish_reason ``stop`` with less text than the reference,
``length`` with fewer tokens than asked, a stream without a finish_reason); **hanging** when it
has not ended ``hang_s`` seconds after it was sent. Streams (raw Server-Sent Events) and whole
replies alike, temperature 0, all to 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

from helpers.client import iter_sse_data

TOPICS = ("a ship", "a robot", "a cat", "the sea", "a mountain", "a city", "a garden", "a train")
PROMPTS = tuple(f"Write a long story about {topic}." for topic in TOPICS)
VERDICTS = ("whole", "error", "short", "hanging")


@dataclass
class Reply:
    """What one client saw, and the column it was counted in (``verdict``) with the reason."""

    stream: bool
    prompt: str = ""
    status: int | None = None
    text: str = ""
    pieces: int = 0
    finish: str | None = None
    tokens: int | None = None  # completion tokens from the usage, when the server sent it
    error: str | None = None
    timed_out: bool = False
    seconds: float = 0.0
    verdict: str = ""
    why: str = ""


def session() -> requests.Session:
    """A session that never sends loopback calls through a proxy from the environment."""
    http = requests.Session()
    http.trust_env = False
    return http


def send(url: str, model: str, prompt: str, tokens: int, stream: bool, hang_s: float,
         http: requests.Session | None = None,
         on_piece: Callable[[Reply], None] | None = None) -> Reply:
    """One greedy chat request; never waits much longer than ``hang_s`` for its end."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    reply, started = Reply(stream, prompt), time.monotonic()
    try:
        with (http or session()).post(url + "/v1/chat/completions", json=body, stream=stream,
                                      timeout=(5, hang_s)) as response:
            reply.status = response.status_code
            if response.status_code >= 400:
                reply.error = f"HTTP {response.status_code}: {response.text[:160]}"
            elif stream:
                _read_stream(response, reply, started + hang_s, on_piece)
            else:
                _read_whole(response.json(), reply)
    except requests.RequestException as exc:  # a read timeout inside a stream is a ConnectionError
        if isinstance(exc, requests.Timeout) or "timed out" in str(exc):
            reply.timed_out = True
        else:
            reply.error = f"{type(exc).__name__}: {str(exc)[:160]}"
    except (ValueError, KeyError, IndexError, TypeError) as exc:  # not the reply's shape
        reply.error = f"malformed reply: {type(exc).__name__}: {str(exc)[:120]}"
    reply.seconds = round(time.monotonic() - started, 2)
    return reply


def _read_stream(response: requests.Response, reply: Reply, deadline: float,
                 on_piece: Callable[[Reply], None] | None) -> None:
    for line in response.iter_lines():
        # Every line, keep-alive pings included: a stream that only pings has hung all the same.
        if time.monotonic() > deadline:
            reply.timed_out = True
            return
        data = next(iter_sse_data([line]), None)
        if data == "[DONE]":
            return
        if not data or not data.startswith("{"):
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            reply.error = f"error event: {str(message)[:160]}"
        for choice in chunk.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                reply.text += piece
                reply.pieces += 1
                if on_piece is not None:
                    on_piece(reply)
            reply.finish = choice.get("finish_reason") or reply.finish
        if chunk.get("usage"):
            reply.tokens = chunk["usage"].get("completion_tokens")


def _read_whole(data: dict[str, Any], reply: Reply) -> None:
    choice = data["choices"][0]
    reply.text = choice["message"]["content"] or ""
    reply.finish = choice.get("finish_reason")
    reply.tokens = (data.get("usage") or {}).get("completion_tokens")


def classify(reply: Reply, reference: Reply | None, max_tokens: int) -> Reply:
    """Put ``reply`` in one column (``verdict``) and say why; ``reference``: the greedy answer."""
    ref_text = reference.text if reference is not None else ""
    if reply.timed_out:
        reply.verdict, reply.why = "hanging", "no end within the client's timeout"
    elif reply.error:
        reply.verdict, reply.why = "error", reply.error
    elif reply.finish is None:
        reply.verdict, reply.why = "short", "ended without a finish_reason"
    elif reply.finish == "length" and reply.tokens is not None:
        whole = reply.tokens == max_tokens
        reply.verdict = "whole" if whole else "short"
        reply.why = "" if whole else f"finish length after {reply.tokens} of {max_tokens} tokens"
    elif not reply.text or len(reply.text) < len(ref_text):
        cut = "a cut greedy answer" if ref_text.startswith(reply.text) else "diverged"
        reply.verdict = "short"
        reply.why = (f"finish {reply.finish} with {len(reply.text)} of {len(ref_text)} "
                     f"characters ({cut})")
    else:
        reply.verdict, reply.why = "whole", ""
    return reply


def references(url: str, model: str, prompts: Sequence[str], tokens: int,
               hang_s: float = 120.0) -> dict[str, Reply]:
    """The undisturbed greedy answer to each prompt, one at a time; raises if one fails."""
    http, out = session(), {}
    for prompt in prompts:
        reply = send(url, model, prompt, tokens, False, hang_s, http)
        if reply.error or reply.timed_out or reply.finish is None:
            why = "timed out" if reply.timed_out else reply.error or "no finish_reason"
            raise RuntimeError(f"no reference answer for {prompt!r}: {why}")
        out[prompt] = reply
    return out


@dataclass
class Load:
    """The traffic around one fault: ``clients`` threads, each sending greedy requests in turn
    (streamed and whole alternately) until ``after_s`` after the fault, ``per_client`` at most."""

    clients: int = 8
    tokens: int = 40
    after_s: float = 6.0
    per_client: int = 4
    hang_s: float = 30.0
    recover_s: float = 60.0  # how long the probes look for "served again"
    probes: int = 3  # small requests per probe round, sent together


@dataclass
class FaultResult:
    """One row of the table; ``replies`` keeps each request for a second look."""

    fault: str
    sent: int = 0
    whole: int = 0
    error: int = 0
    short: int = 0
    hanging: int = 0
    left_over: int | None = None
    served_again_s: float | None = None
    served_again: str = "n/a"
    differs: int = 0  # whole, yet not the greedy reference's text
    notes: list[str] = field(default_factory=list)
    replies: list[dict[str, Any]] = field(default_factory=list)

    def count(self, replies: Sequence[Reply], refs: Mapping[str, Reply]) -> FaultResult:
        """Fill the columns from the classified replies."""
        self.sent = len(replies)
        for verdict in VERDICTS:
            setattr(self, verdict, sum(r.verdict == verdict for r in replies))
        self.differs = sum(r.verdict == "whole" and r.text != refs[r.prompt].text
                           for r in replies if r.prompt in refs)
        self.replies = [{"stream": r.stream, "verdict": r.verdict, "why": r.why,
                         "status": r.status, "finish": r.finish, "tokens": r.tokens,
                         "chars": len(r.text), "seconds": r.seconds} for r in replies]
        return self


def under_load(name: str, url: str, model: str, refs: Mapping[str, Reply], load: Load,
               inject: Callable[[], Sequence[str] | None], probe: bool = True,
               log: Callable[[str], None] = print) -> FaultResult:
    """Start the load, inject the fault once streams run, count every request.

    ``inject`` returns notes for the table. With ``probe``, small requests measure the time
    from the fault until the server answers whole again (``served_again``).
    """
    replies: list[Reply] = []
    lock, warm, stop_sending = threading.Lock(), threading.Event(), threading.Event()
    in_flight = [0]
    prompts = list(refs)

    def on_piece(reply: Reply) -> None:
        if reply.pieces >= 3:  # generation is under way: the fault hits running requests
            warm.set()

    def client(i: int) -> None:
        http = session()
        for j in range(load.per_client):
            if stop_sending.is_set():
                return
            prompt = prompts[(i + j * load.clients) % len(prompts)]
            with lock:
                in_flight[0] += 1
            reply = send(url, model, prompt, load.tokens, (i + j) % 2 == 0, load.hang_s, http,
                         on_piece)
            classify(reply, refs.get(prompt), load.tokens)
            with lock:
                in_flight[0] -= 1
                replies.append(reply)
            warm.set()  # one ended (a broken server ends them at once): no use waiting longer

    result = FaultResult(name)
    threads = [threading.Thread(target=client, args=(i,), daemon=True, name=f"fault-client-{i}")
               for i in range(load.clients)]
    for thread in threads:
        thread.start()
    if not warm.wait(60):
        result.notes.append("no stream had started within 60 s of the load")
    at = time.monotonic()
    log(f"  {name}: injecting")
    result.notes += list(inject() or ())
    again: list[float | None] = []
    probes: list[Reply] = []
    prober = threading.Thread(target=lambda: again.append(served_again(
        url, model, at, load.recover_s, load.probes, seen=probes)), daemon=True,
        name="fault-prober")
    if probe:
        prober.start()
    stop_sending.wait(load.after_s)
    stop_sending.set()
    end = at + load.after_s + load.hang_s + 30  # every request is bounded by hang_s
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    with lock:
        stuck = in_flight[0]
        result.count(list(replies), refs)
    if stuck:  # a request that outlived even its own timeout
        result.sent += stuck
        result.hanging += stuck
        result.notes.append(f"{stuck} request(s) still open when counting")
    if probe:
        prober.join(load.recover_s + 20)
        result.served_again_s = again[0] if again else None
        result.served_again = (f"{result.served_again_s:.1f} s" if result.served_again_s
                               is not None else f"not within {load.recover_s:.0f} s")
        # The probes start at the fault: it may hit them rather than the load. Say so.
        hit = {v: sum(p.verdict == v for p in list(probes)) for v in VERDICTS[1:]}
        if any(hit.values()):
            result.notes.append("probes (not counted above): " + ", ".join(
                f"{n} {'timed out' if v == 'hanging' else v}" for v, n in hit.items() if n))
    log(f"  {name}: {summary(result)}")
    return result


def served_again(url: str, model: str, since: float, limit_s: float, width: int = 3,
                 timeout: float = 15.0, tokens: int = 4,
                 seen: list[Reply] | None = None) -> float | None:
    """Seconds from ``since`` until a round of ``width`` small requests (distinct prompts, sent
    together) has all answered whole, each within ``timeout``; None: not within ``limit_s``.

    Each asks for a long story in ``tokens`` tokens: whole means it stopped by length with
    ``tokens`` tokens, so a short answer does not count as served either. Every probe's reply
    goes into ``seen``."""
    deadline = since + limit_s

    def probe(i: int) -> bool:
        prompt = f"[{uuid.uuid4().hex[:8]}] {PROMPTS[i % len(PROMPTS)]}"
        reply = classify(send(url, model, prompt, tokens, False, timeout), None, tokens)
        if seen is not None:
            seen.append(reply)
        return reply.verdict == "whole" and reply.finish == "length"

    with ThreadPoolExecutor(width) as pool:
        while time.monotonic() < deadline:
            if all(pool.map(probe, range(width))):
                return round(time.monotonic() - since, 1)
            time.sleep(0.5)
    return None


def summary(result: FaultResult) -> str:
    """One line: the columns of ``result``."""
    return (f"sent {result.sent}, whole {result.whole}, error {result.error}, "
            f"short {result.short}, hanging {result.hanging}, served again {result.served_again}")
