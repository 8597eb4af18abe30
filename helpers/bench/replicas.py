"""Past one engine, measured: ``python -m helpers.bench.replicas``.

It took 9-11 min on a 2-core machine shared with other jobs, where one vLLM start took ~2 min;
on a quiet one the starts take ~30-40 s and the whole run should stay within ~6 min.

Every figure goes through ``dhllm serve --engine vllm`` in its own process, as deployed:

1. **1 replica vs 2 on the same cores**: ``--replicas 1`` (one vLLM on every core) against
   ``--replicas 2`` (two vLLM, each pinned to half the cores, vllm-router in front); 30
   learners ask at once for 48 tokens each: aggregate tokens/s, p50/p95 latency, errors.
2. **cache-aware vs round-robin**: the persona conversation (8 turns, ~600-token system
   prompt) through the 2-replica set-up (cache-aware), then through a second gateway with
   ``--policy round_robin`` over the same replicas (``DHLLM_VLLM_URL=url1,url2``): time to
   first token and cached prompt tokens per turn.
3. **``kill -9`` of one replica under load**: non-streamed and streamed requests in flight
   when the busiest replica's API server is killed; requests lost, streams cut (with an
   error event), and the seconds until ``/health`` shows it taken out and back.

vLLM starts with ``--enforce-eager`` (no torch.compile: ~20 s a start instead of ~60-90 s) and
1 GiB of KV cache per replica, both for 1 and 2 replicas. Absolute figures depend on the
machine's load: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests

from helpers.background_server import free_port
from helpers.bench.load import percentile
from helpers.bench.peers import ServerProcess
from helpers.bench.persona import TURNS, conversation
from helpers.client import iter_sse_data

MODEL = "embedded"
TOPICS = ["a ship", "a robot", "a cat", "the sea", "a mountain", "a city", "a garden", "a train",
          "a river", "a dragon"]


@dataclass
class Answer:
    """One streamed reply, timed: first piece, end, tokens, cached prompt tokens, error."""

    text: str = ""
    ttft: float = 0.0
    seconds: float = 0.0
    tokens: int = 0
    cached: int = 0
    error: str | None = None


def ask(url: str, messages: list[dict[str, str]], tokens: int, temperature: float,
        stream: bool = True) -> Answer:
    """One chat request; a streamed one records its first piece and an error event."""
    body = {"model": MODEL, "messages": messages, "max_tokens": tokens,
            "temperature": temperature, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    answer, started = Answer(), time.perf_counter()
    try:
        with requests.post(url + "/v1/chat/completions", json=body, stream=stream,
                           timeout=300) as response:
            if response.status_code != 200:
                answer.error = f"HTTP {response.status_code}"
            elif not stream:
                usage = response.json()["usage"]
                answer.tokens = usage["completion_tokens"]
                answer.cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            else:
                _read_stream(response, answer, started)
    except requests.RequestException as exc:
        answer.error = type(exc).__name__
    answer.seconds = time.perf_counter() - started
    return answer


def _read_stream(response: requests.Response, answer: Answer, started: float) -> None:
    for data in iter_sse_data(response.iter_lines()):
        if not data.startswith("{"):
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            answer.error = "error event"
        for choice in chunk.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content")
            if piece and not answer.text:
                answer.ttft = time.perf_counter() - started
            answer.text += piece or ""
        usage = chunk.get("usage")
        if usage:
            answer.tokens = usage["completion_tokens"]
            answer.cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def classroom(url: str, learners: int, tokens: int) -> dict[str, Any]:
    """``learners`` streamed requests sent at once: tokens/s, p50/p95 seconds, errors."""
    barrier = threading.Barrier(learners)

    def learner(i: int) -> Answer:
        barrier.wait()
        prompt = f"Tell me a short story about {TOPICS[i % len(TOPICS)]} ({i})."
        return ask(url, [{"role": "user", "content": prompt}], tokens, 0.7)

    started = time.perf_counter()
    with ThreadPoolExecutor(learners) as pool:
        answers = list(pool.map(learner, range(learners)))
    wall = time.perf_counter() - started
    ok = [a for a in answers if a.error is None]
    times = [a.seconds for a in ok]
    return {"tokens_per_s": round(sum(a.tokens for a in ok) / wall, 1),
            "p50_s": round(percentile(times, 50), 2), "p95_s": round(percentile(times, 95), 2),
            "errors": len(answers) - len(ok)}


def persona_turns(url: str, tokens: int) -> dict[str, Any]:
    """The persona conversation, greedy, with a prefix no replica has seen: TTFT and cached."""
    salt, answers, ttft, cached = f"[visit {uuid.uuid4().hex[:8]}] ", [], [], []
    for turn in range(len(TURNS)):
        messages = conversation(answers, turn)
        messages[0]["content"] = salt + messages[0]["content"]
        answer = ask(url, messages, tokens, 0.0)
        answers.append(answer.text)
        ttft.append(round(answer.ttft * 1000))
        cached.append(answer.cached)
    return {"ttft_ms": ttft, "cached_tokens": cached}


def kill_under_load(gateway: ServerProcess, requests_n: int, streams: int,
                    tokens: int) -> dict[str, Any]:
    """Kill -9 the busiest replica's API server while requests run; what was lost, how long."""
    replicas = replica_processes(gateway.proc.pid)
    url = gateway.url
    with ThreadPoolExecutor(requests_n + streams) as pool:
        plain = [pool.submit(ask, url, _story(i), tokens, 0.7, False) for i in range(requests_n)]
        streamed = [pool.submit(ask, url, _story(i), tokens, 0.7) for i in range(streams)]
        deadline = time.monotonic() + 120
        load = {port: 0.0 for port in replicas}
        while sum(load.values()) < (requests_n + streams) * 0.6 and time.monotonic() < deadline:
            load = {port: running(port) for port in replicas}
            time.sleep(0.2)
        victim = max(load, key=lambda port: load[port])
        os.kill(replicas[victim], signal.SIGKILL)
        killed = time.monotonic()
        out_s = _wait_health(url, lambda h: h["healthy"] < h["total"], killed, 60)
        plain_answers = [f.result() for f in plain]
        stream_answers = [f.result() for f in streamed]
    back_s = _wait_health(url, lambda h: h["healthy"] == h["total"], killed, 600)
    health = requests.get(url + "/health", timeout=10).json()["replicas"]
    return {"in_flight_on_victim": load[victim],
            "non_streamed": requests_n,
            "non_streamed_lost": sum(a.error is not None for a in plain_answers),
            "streams": streams,
            "streams_cut_with_error_event": sum(a.error == "error event"
                                                for a in stream_answers),
            "streams_failed_otherwise": sum(a.error not in (None, "error event")
                                            for a in stream_answers),
            "taken_out_after_s": out_s, "back_after_s": back_s,
            "retried": health["retried"], "continued": health.get("continued", 0),
            "restarts": health["restarts"]}


def _story(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a story about {TOPICS[i % len(TOPICS)]} ({i})."}]


def _wait_health(url: str, done: Callable[[dict[str, Any]], bool], since: float,
                 timeout: float) -> float | None:
    """Seconds from ``since`` until the gateway's replica health satisfies ``done``."""
    while time.monotonic() - since < timeout:
        try:
            if done(requests.get(url + "/health", timeout=5).json()["replicas"]):
                return round(time.monotonic() - since, 1)
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return None


def replica_processes(gateway_pid: int) -> dict[int, int]:
    """``{port: pid}`` of the vLLM API servers a ``dhllm serve`` process started."""
    found = {}
    for child in psutil.Process(gateway_pid).children():
        cmd = child.cmdline()
        if "vllm.entrypoints.openai.api_server" in cmd:
            found[int(cmd[cmd.index("--port") + 1])] = child.pid
    return found


def running(port: int) -> float:
    """Requests vLLM on ``port`` is generating now (its Prometheus metrics)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(v) for v in
               re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)", text, re.M))


def gateway(replicas: int, env: dict[str, str], progress: Callable[[str], None]) -> ServerProcess:
    """``dhllm serve --engine vllm --replicas N`` in its own process, once it answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "helpers", "serve", "--model", MODEL, "--port", str(port),
           "--engine", "vllm", "--replicas", str(replicas)]
    progress(f"starting: dhllm serve --engine vllm --replicas {replicas} "
             f"{' '.join(f'{k}={v}' for k, v in env.items() if k.startswith('DHLLM_VLLM_U'))}")
    started = time.monotonic()
    server = ServerProcess(cmd, port, MODEL, env).wait(900)
    progress(f"  up after {time.monotonic() - started:.0f} s")
    return server


def measure(learners: int = 30, tokens: int = 48, runs: int = 2, eager: bool = True,
            order: tuple[int, ...] = (1, 2),
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    """All three measurements; returns the figures (also printed as they come)."""
    env = {"DHLLM_VLLM_KVCACHE_GB": "1", "DHLLM_API_KEY": "",
           "DHLLM_VLLM_ARGS": "--enforce-eager" if eager else ""}
    results: dict[str, Any] = {"learners": learners, "tokens": tokens,
                               "cores": len(os.sched_getaffinity(0)), "eager": eager}
    for n in order:
        server = gateway(n, env, progress)
        try:
            classroom(server.url, learners, tokens)  # warm-up: vLLM is slow in its first runs
            runs_out = [classroom(server.url, learners, tokens) for _ in range(runs)]
            results.setdefault(f"replicas_{n}", []).extend(runs_out)
            progress(f"  {learners} learners, {n} replica(s): {runs_out}")
            if n == 2:
                results.update(policies_and_kill(server, env, tokens, progress))
        finally:
            server.stop()
    return results


def policies_and_kill(server: ServerProcess, env: dict[str, str], tokens: int,
                      progress: Callable[[str], None]) -> dict[str, Any]:
    """On the 2-replica set-up: persona turns by policy, then a replica killed under load."""
    out: dict[str, Any] = {"cache_aware": persona_turns(server.url, tokens)}
    progress(f"  persona, cache_aware: {out['cache_aware']}")
    urls = ",".join(f"http://127.0.0.1:{p}" for p in replica_processes(server.proc.pid))
    second = gateway(1, {**env, "DHLLM_VLLM_URL": urls, "DHLLM_VLLM_POLICY": "round_robin"},
                     progress)
    try:
        out["round_robin"] = persona_turns(second.url, tokens)
    finally:
        second.stop()
    progress(f"  persona, round_robin: {out['round_robin']}")
    out["kill"] = kill_under_load(server, requests_n=16, streams=4, tokens=tokens)
    progress(f"  kill -9 under load: {out['kill']}")
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m helpers.bench.replicas [--json PATH] [--learners 30] [--tokens 48]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--learners", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=2, help="measured runs per set-up")
    parser.add_argument("--compiled", action="store_true",
                        help="let vLLM compile (slower starts, faster steps)")
    parser.add_argument("--order", default="1,2",
                        help="replica counts, in the order measured (e.g. 2,1 or 1,2,1)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    order = tuple(int(n) for n in args.order.split(","))
    results = measure(args.learners, args.tokens, args.runs, eager=not args.compiled, order=order)
    results["minutes"] = round((time.monotonic() - started) / 60, 1)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
