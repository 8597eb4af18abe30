"""``dhllm bench``: what a digital human's users feel, for our server and its peers, in one run.

Per server (each in its own process, started by name from ``peers.PEERS``, the servers taking
turns round after round, A B A B): aggregate tokens/s for 1, 8 and 16 concurrent streaming
clients, 8 clients with the chapter's sampling (``POST /``'s top_k 20 and repetition_penalty
1.15, for servers that take them), a classroom of 30 requests at once (p50/p95 of each request's time), time to first token and to
the first whole sentence
(what a TTS voice waits for), TTFT at turn 1 and turn 8 of a conversation with a ~600-token
persona (prefix reuse), and the longest pause of 3 running streams while a ~1500-token prompt
arrives, against their median gap between tokens (chunked prefill). Also: the server's overhead
against calling the model directly, ``/health`` latency under load, transformers'
``generate_batch`` against our engine, and a plot of tokens/s against 1..16 clients. Absolute
numbers depend on the machine's load: compare within one run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from helpers.bench.audio import first_audio, first_audio_table
from helpers.bench.load import (
    CHAPTER_SAMPLING,
    LoadResult,
    health_latency_during,
    merge_loads,
    pause_during_long_prompt,
    percentile,
    persona_ttft,
    run_load,
)
from helpers.bench.offline import direct_tokens_per_s, offline_engines
from helpers.bench.peers import PEERS, Handle, Peer, PeerRequest, ServerProcess, free_port
from helpers.bench.report import format_table, plot_sweep, plot_turns

__all__ = [
    "PEERS", "BenchConfig", "BenchReport", "Handle", "LoadResult", "Peer", "PeerRequest",
    "ServerProcess", "format_table", "free_port", "headline_clients", "main", "run_bench",
    "run_load",
]


@dataclass
class BenchConfig:
    """What to run; the defaults are the full benchmark (several minutes on a 2-core CPU)."""

    model: str = "embedded"
    tokens: int = 48
    temperature: float = 0.7
    rounds: int = 1  # requests each client sends, one after another, in a load run
    repeats: int = 2  # interleaved rounds: every server runs once per round (A B A B)
    clients: Sequence[int] = (1, 8, 16)
    chapter_clients: int = 8  # the chapter's sampling (POST / defaults) at this load; 0 = skip
    classroom: int = 30  # the "30 at once" run: p50/p95 of each request's time (0 = skip)
    sweep: Sequence[int] = (1, 2, 4, 8, 16)
    servers: Sequence[str] = ("dhllm", "serial")  # names in PEERS; "dhllm" gets the extras
    peers: Sequence[str] = ("plain", "cb")  # more names in PEERS, e.g. "vllm", "dhllm-vllm"
    builtin: bool = True
    persona_turns: int = 8  # 0 = skip the conversation
    pause_chars: int = 6000  # the arriving prompt (~1500 tokens); 0 = skip the pause test
    pause_tokens: int = 128  # tokens each running stream asks for
    first_audio: bool = True  # time to first audio, whole answer vs streamed sentences
    plot: Path | None = Path("docs/images/throughput.png")
    json_path: Path | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """A small run (tests, a first look): few tokens, 2 turns, a short arriving prompt."""
        small: dict[str, Any] = {"tokens": 8, "rounds": 1, "repeats": 1, "classroom": 3,
                                 "clients": (1, 2), "chapter_clients": 2, "sweep": (),
                                 "peers": (), "builtin": False, "persona_turns": 2,
                                 "pause_chars": 800, "pause_tokens": 24, "plot": None}
        return cls(**{**small, **overrides})


@dataclass
class BenchReport:
    config: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def measure_load(handle: Handle, cfg: BenchConfig) -> dict[str, LoadResult]:
    """Throughput for each client count, and the classroom: ``cfg.classroom`` requests at once."""
    url, model = handle.url, handle.model
    run_load(url, 1, 1, min(cfg.tokens, 8), 0.7, model)  # warm-up
    out = {str(n): run_load(url, n, cfg.rounds, cfg.tokens, cfg.temperature, model)
           for n in cfg.clients}
    if cfg.classroom:
        out["classroom"] = run_load(url, cfg.classroom, 1, cfg.tokens, cfg.temperature, model)
    return out


def measure_chapter(handle: Handle, cfg: BenchConfig) -> LoadResult:
    """Throughput of ``cfg.chapter_clients`` clients sampling as every ``POST /`` of the chapter
    does (top_k 20, repetition_penalty 1.15): what the chapter's own defaults cost."""
    return run_load(handle.url, cfg.chapter_clients, cfg.rounds, cfg.tokens, cfg.temperature,
                    handle.model, sampling=CHAPTER_SAMPLING)


def measure_latency(handle: Handle, cfg: BenchConfig) -> dict[str, Any]:
    """Time to first audio, TTFT by turn of the persona conversation, and the long-prompt pause."""
    out: dict[str, Any] = {}
    if cfg.first_audio:  # whole answer then TTS vs streamed sentences, at each client count
        out["first_audio"] = {str(n): first_audio(handle.url, handle.model, n, cfg.tokens,
                                                  cfg.temperature)
                              for n in cfg.clients if n <= headline_clients(cfg.clients)}
    if cfg.persona_turns:
        out["persona"] = persona_ttft(handle.url, handle.model, cfg.persona_turns, cfg.tokens)
    if cfg.pause_chars:
        out["pause"] = pause_during_long_prompt(handle.url, handle.model, 3, cfg.pause_tokens,
                                                cfg.pause_chars)
    return out


def _ours_extras(handle: Handle, cfg: BenchConfig, results: dict[str, Any]) -> dict[int, float]:
    """``/health`` latency while the most clients generate, then the sweep."""
    top = max(cfg.clients)
    _, latencies = health_latency_during(handle.url, lambda: run_load(
        handle.url, top, 1, cfg.tokens, cfg.temperature, handle.model))
    results["health_ms_under_load"] = {
        "clients": top, "p50": percentile(latencies, 50) * 1000,
        "p99": percentile(latencies, 99) * 1000, "samples": len(latencies)}
    return _sweep(handle, cfg)


def _sweep(handle: Handle, cfg: BenchConfig) -> dict[int, float]:
    return {n: run_load(handle.url, n, 1, cfg.tokens, cfg.temperature, handle.model).tokens_per_s
            for n in cfg.sweep}


def run_server(name: str, req: PeerRequest, cfg: BenchConfig, report: BenchReport,
               last: bool) -> tuple[dict[str, LoadResult], dict[int, float]]:
    """Start one registered server, measure it, stop it; a peer that fails becomes a note.

    Every round measures the load; the last round (the server warm from the ones before in
    its own earlier processes, caches compiled) adds the latency figures and our extras.
    """
    peer = PEERS[name]
    loads: dict[str, LoadResult] = {}
    sweep: dict[int, float] = {}
    handle = None
    try:
        handle = peer.start(req).wait(600)  # vLLM peers compile for ~60-95 s
        loads = measure_load(handle, cfg)
        if peer.chapter_sampling and cfg.chapter_clients:
            loads["chapter"] = measure_chapter(handle, cfg)
        if last and name != "serial":
            report.results.setdefault(peer.key, {}).update(measure_latency(handle, cfg))
        if last and name == "dhllm":
            sweep = _ours_extras(handle, cfg, report.results)
        elif last and name == "serial":
            sweep = _sweep(handle, cfg)
    except Exception as exc:  # a peer that cannot run is reported, not fatal
        report.notes.append(f"{peer.key}: could not run: {type(exc).__name__}: {exc}")
    finally:
        if handle is not None:
            handle.stop()
    return loads, sweep


def run_interleaved(names: Sequence[str], req: PeerRequest, cfg: BenchConfig,
                    report: BenchReport, log: Callable[[str], None]) -> dict[str, dict[int, float]]:
    """Each server in its own process, once per round, rounds A B A B: the machine's drift
    (+-30 % within minutes on a shared CPU) falls on every server alike. One server runs at
    a time, so peers never compete for the cores or the memory."""
    unknown = [n for n in names if n not in PEERS]
    report.notes += [f"{n}: no such peer (known: {', '.join(PEERS)})" for n in unknown]
    names = [n for n in names if n in PEERS]
    rounds: dict[str, list[dict[str, LoadResult]]] = {n: [] for n in names}
    sweeps: dict[str, dict[int, float]] = {}
    for r in range(max(1, cfg.repeats)):
        last = r == max(1, cfg.repeats) - 1
        for name in names:
            if r and not rounds[name]:
                continue  # it failed in the first round: once is enough
            log(f"round {r + 1}/{max(1, cfg.repeats)}: {PEERS[name].label} ...")
            loads, sweep = run_server(name, req, cfg, report, last)
            if loads:
                rounds[name].append(loads)
            if sweep:
                sweeps[name] = sweep
    for name, runs in rounds.items():
        if not runs:
            continue
        out = report.results.setdefault(PEERS[name].key, {})
        for key in runs[0]:
            out[key] = merge_loads([run[key] for run in runs if key in run])
        low, high = str(min(cfg.clients)), str(headline_clients(cfg.clients))
        out["ratio"] = out[high]["tokens_per_s"] / max(out[low]["tokens_per_s"], 1e-9)
        if "chapter" in out and str(cfg.chapter_clients) in out:
            out["chapter_vs_plain"] = (out["chapter"]["tokens_per_s"]
                                       / max(out[str(cfg.chapter_clients)]["tokens_per_s"], 1e-9))
    return sweeps


def headline_clients(clients: Sequence[int]) -> int:
    """The "many clients" column of the table: 8 (a classroom's table) when measured."""
    return 8 if 8 in clients else max(clients)


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> BenchReport:
    """Run everything ``cfg`` asks for; return the figures (also printed by ``main``)."""
    from helpers.chat import TransformersChat

    report = BenchReport(config={k: (list(v) if isinstance(v, tuple) else str(v)
                                     if isinstance(v, Path) else v)
                                 for k, v in asdict(cfg).items()})
    log(f"loading {cfg.model} ...")
    chat = TransformersChat.load(cfg.model, verbose=False)
    model_dir = str(getattr(chat.model, "name_or_path", "") or cfg.model)
    req = PeerRequest(cfg.model, model_dir, chat.name, cfg.tokens)
    results = report.results
    log("direct model.generate (no server) ...")
    direct = direct_tokens_per_s(chat, cfg.tokens, cfg.temperature)
    sweeps = run_interleaved([*cfg.servers, *cfg.peers], req, cfg, report, log)
    if "ours" in results:
        one = results["ours"][str(min(cfg.clients))]["tokens_per_s"]
        results["overhead"] = {"direct_tokens_per_s": direct,
                               "server_1_client_tokens_per_s": one,
                               "server_vs_direct": one / direct if direct else 0.0}
    if cfg.sweep:
        results["sweep"] = {"clients": list(cfg.sweep),
                            **{PEERS[n].key: [sweeps[n].get(c, 0.0) for c in cfg.sweep]
                               for n in ("dhllm", "serial") if sweeps.get(n)}}
    if cfg.builtin:
        log("offline: transformers generate_batch vs our engine ...")
        results["offline_engines"] = offline_engines(chat, max(cfg.clients), cfg.tokens,
                                                     cfg.temperature)
    if cfg.plot:
        plot_sweep(results, cfg.plot, chat.name)
        turns = cfg.plot.with_name("ttft_by_turn.png")
        plot_turns(results, turns, chat.name)
        report.notes.append(f"plots written to {cfg.plot} and {turns}")
    if cfg.json_path:
        cfg.json_path.write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
    return report


def main(cfg: BenchConfig) -> BenchReport:
    """Run, then print the table and the JSON of the same run."""
    report = run_bench(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(report))
    print(first_audio_table(report))
    print(json.dumps(asdict(report), indent=2))
    return report
