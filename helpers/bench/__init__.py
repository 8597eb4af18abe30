"""``dhllm bench``: throughput of the API server under concurrent clients, against peers.

One run measures, on one model and one load (OpenAI API, streaming, N tokens each):
aggregate tokens/s for 1 and 8 concurrent clients for our batching server, a serial
chapter-style server (the same app, one request at a time) and ``transformers serve`` with and
without ``--continuous-batching``; the server's overhead against calling the model directly;
time to first token; ``/health`` latency while 8 clients generate; transformers' own offline
continuous batching (``generate_batch``) against our engine; and a plot of tokens/s against
1, 2, 4, 8, 16 clients. Absolute numbers depend on the machine's load: compare within one run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

PROMPT = "Tell me a short story about a brave little robot."


@dataclass
class LoadResult:
    """One load run: ``clients`` concurrent clients, ``rounds`` requests each."""

    clients: int
    tokens: int
    seconds: float
    ttft_p50: float
    full_p50: float
    errors: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class BenchConfig:
    """What to run; the defaults are the full benchmark (a few minutes on a 2-core CPU)."""

    model: str = "embedded"
    tokens: int = 48
    temperature: float = 0.7
    rounds: int = 2
    clients: Sequence[int] = (1, 8)
    sweep: Sequence[int] = (1, 2, 4, 8, 16)
    peers: Sequence[str] = ("plain", "cb")  # transformers serve without / with --continuous-batching
    builtin: bool = True
    plot: Path | None = Path("docs/images/throughput.png")
    json_path: Path | None = None


@dataclass
class BenchReport:
    config: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Load generation: threads with requests, streaming, like real chat clients.


def _one_request(url: str, model: str, tokens: int, temperature: float,
                 session: requests.Session) -> tuple[int, float, float]:
    """(completion tokens, time to first token, full time) of one streamed chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": tokens, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, chunks, usage = None, 0, None
    with session.post(f"{url}/v1/chat/completions", json=body, stream=True,
                      timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - started
    full = time.perf_counter() - started
    return (usage if usage is not None else chunks), (first or full), full


def run_load(url: str, clients: int, rounds: int = 1, tokens: int = 48,
             temperature: float = 0.7, model: str = "model") -> LoadResult:
    """``clients`` threads each send ``rounds`` requests one after another; all start together."""
    barrier = threading.Barrier(clients)

    def client(_: int) -> list[tuple[int, float, float] | None]:
        session = requests.Session()
        barrier.wait()
        out: list[tuple[int, float, float] | None] = []
        for _round in range(rounds):
            try:
                out.append(_one_request(url, model, tokens, temperature, session))
            except requests.RequestException:
                out.append(None)
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    seconds = time.perf_counter() - started
    ok = [r for r in results if r is not None]
    return LoadResult(
        clients=clients, tokens=sum(r[0] for r in ok), seconds=seconds,
        ttft_p50=statistics.median(r[1] for r in ok) if ok else 0.0,
        full_p50=statistics.median(r[2] for r in ok) if ok else 0.0,
        errors=len(results) - len(ok),
    )


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


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------------------------
# Peers: ``transformers serve`` in a subprocess.


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server in its own process, as in production, so the load generator's threads do not
    compete with it for the GIL (in one process they cost our server ~40 % of its throughput)."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"dhllm-bench-server-{port}.log"
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})

    @classmethod
    def dhllm(cls, model: str, tokens: int, max_batch_size: int = 16) -> ServerProcess:
        """``dhllm serve`` (our engine); ``max_batch_size=1`` makes it the serial baseline."""
        port = _free_port()
        env = {"DHLLM_MAX_BATCH_SIZE": str(max_batch_size),
               "DHLLM_DEFAULT_MAX_NEW_TOKENS": str(tokens), "DHLLM_API_KEY": ""}
        return cls([sys.executable, "-m", "helpers", "serve", "--model", model,
                    "--port", str(port)], port, env)

    @classmethod
    def transformers(cls, model_dir: str, continuous_batching: bool) -> ServerProcess:
        """``transformers serve MODEL_DIR --port P --device cpu [--continuous-batching]``."""
        exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
        port = _free_port()
        cmd = [exe, "serve", model_dir, "--port", str(port), "--device", "cpu"]
        if continuous_batching:
            cmd.append("--continuous-batching")
        return cls(cmd, port)

    def wait(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-500:]
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {tail}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the server did not answer /health within {timeout:.0f} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# The benchmark.


def _warm(url: str, model: str, tokens: int) -> None:
    run_load(url, 1, 1, min(tokens, 8), 0.7, model)


def _pair(url: str, cfg: BenchConfig, model: str) -> dict[str, Any]:
    """1 and max(clients) concurrent clients: tokens/s and the ratio."""
    out: dict[str, Any] = {}
    for n in cfg.clients:
        out[str(n)] = asdict(run_load(url, n, cfg.rounds, cfg.tokens, cfg.temperature, model))
        out[str(n)]["tokens_per_s"] = out[str(n)]["tokens"] / out[str(n)]["seconds"]
    low, high = str(min(cfg.clients)), str(max(cfg.clients))
    out["ratio"] = out[high]["tokens_per_s"] / max(out[low]["tokens_per_s"], 1e-9)
    return out


def direct_tokens_per_s(chat: Any, tokens: int, temperature: float, repeats: int = 2) -> float:
    """One stream straight through ``model.generate`` (no server): the overhead baseline."""
    import torch

    ids = torch.tensor([chat.prompt_ids([{"role": "user", "content": PROMPT}])],
                       device=chat.model.device)
    total, seconds = 0, 0.0
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            out = chat.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=tokens, do_sample=True,
                                      temperature=temperature, top_p=1.0, top_k=None,
                                      pad_token_id=chat.tokenizer.pad_token_id)
            seconds += time.perf_counter() - started
            total += out.shape[1] - ids.shape[1]
    return total / seconds


def offline_engines(chat: Any, n: int, tokens: int, temperature: float) -> dict[str, Any]:
    """transformers' generate_batch (paged continuous batching) against our engine, no HTTP."""
    from transformers import GenerationConfig

    from helpers.chat import GenerationParams
    from helpers.server.engine import BatchingEngine

    messages = [{"role": "user", "content": PROMPT}]
    ids = chat.prompt_ids(messages)
    out: dict[str, Any] = {}
    config = GenerationConfig(max_new_tokens=tokens, do_sample=True, temperature=temperature,
                              top_p=1.0, top_k=0, eos_token_id=sorted(chat.eos_token_ids()),
                              pad_token_id=chat.tokenizer.pad_token_id)
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        # By default the paged cache takes most of the RAM, which costs seconds per call on a CPU;
        # a modest cache, allocated once (persistent manager), is the fair comparison.
        cb_config = ContinuousBatchingConfig(max_memory_percent=0.1, max_requests_per_batch=n)
        run = lambda k: chat.model.generate_batch(  # noqa: E731
            [ids] * k, generation_config=config, continuous_batching_config=cb_config,
            persistent_manager=True)
        try:
            run(n)  # warm-up, at the size measured
            for k in (1, n):
                started = time.perf_counter()
                made = sum(len(r.generated_tokens) for r in run(k).values())
                out[f"builtin_{k}"] = made / (time.perf_counter() - started)
        finally:
            chat.model.destroy_cached_continuous_batching_manager()
    except Exception as exc:  # an API that changes between releases: report, go on
        out["builtin_error"] = f"{type(exc).__name__}: {exc}"
    engine = BatchingEngine(chat, max_batch_size=max(n, 1))
    engine.start()
    try:
        params = GenerationParams(max_new_tokens=tokens, temperature=temperature)
        list(engine.submit(messages, params))  # warm-up
        for k in (1, n):
            started = time.perf_counter()
            streams = [engine.submit(messages, params) for _ in range(k)]
            for stream in streams:
                list(stream)
            made = sum(s.finish.completion_tokens for s in streams if s.finish)
            out[f"ours_{k}"] = made / (time.perf_counter() - started)
    finally:
        engine.stop()
    return out


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> BenchReport:
    """Run everything ``cfg`` asks for; return the figures (also printed by ``main``)."""
    from helpers.chat import TransformersChat

    report = BenchReport(config={k: (list(v) if isinstance(v, tuple) else str(v)
                                     if isinstance(v, Path) else v)
                                 for k, v in asdict(cfg).items()})
    log(f"loading {cfg.model} ...")
    chat = TransformersChat.load(cfg.model, verbose=False)
    model_dir = str(getattr(chat.model, "name_or_path", "") or cfg.model)
    name = chat.name
    results = report.results

    log("direct model.generate (no server) ...")
    direct = direct_tokens_per_s(chat, cfg.tokens, cfg.temperature)

    log("our server (continuous batching) ...")
    sweep_ours: dict[int, float] = {}
    with ServerProcess.dhllm(cfg.model, cfg.tokens) as handle:
        _warm(handle.url, name, cfg.tokens)
        results["ours"] = _pair(handle.url, cfg, name)
        top = max(cfg.clients)
        load, latencies = health_latency_during(
            handle.url, lambda: run_load(handle.url, top, 1, cfg.tokens, cfg.temperature, name))
        results["health_ms_under_load"] = {
            "clients": top, "p50": _percentile(latencies, 0.5) * 1000,
            "p99": _percentile(latencies, 0.99) * 1000, "samples": len(latencies)}
        for n in cfg.sweep:
            sweep_ours[n] = run_load(handle.url, n, 1, cfg.tokens, cfg.temperature,
                                     name).tokens_per_s
    one = results["ours"].get("1", {}).get("tokens_per_s", 0.0)
    results["overhead"] = {"direct_tokens_per_s": direct, "server_1_client_tokens_per_s": one,
                           "server_vs_direct": one / direct if direct else 0.0}

    log("serial chapter-style server (one request at a time) ...")
    sweep_serial: dict[int, float] = {}
    with ServerProcess.dhllm(cfg.model, cfg.tokens, max_batch_size=1) as handle:
        _warm(handle.url, name, cfg.tokens)
        results["serial"] = _pair(handle.url, cfg, name)
        for n in cfg.sweep:
            sweep_serial[n] = run_load(handle.url, n, 1, cfg.tokens, cfg.temperature,
                                       name).tokens_per_s
    results["sweep"] = {"clients": list(cfg.sweep), "ours": [sweep_ours[n] for n in cfg.sweep],
                        "serial": [sweep_serial[n] for n in cfg.sweep]}

    for label, cb in (("transformers_serve", False), ("transformers_serve_cb", True)):
        if ("cb" if cb else "plain") in cfg.peers:
            log(f"{label.replace('_', ' ')} ...")
            peer = ServerProcess.transformers(model_dir, cb)
            try:
                peer.wait()
                _warm(peer.url, model_dir, cfg.tokens)
                results[label] = _pair(peer.url, cfg, model_dir)
            except Exception as exc:  # a peer that cannot run is reported, not fatal
                report.notes.append(f"{label}: could not run: {exc}")
            finally:
                peer.stop()

    if cfg.builtin:
        log("offline: transformers generate_batch vs our engine ...")
        results["offline_engines"] = offline_engines(chat, max(cfg.clients), cfg.tokens,
                                                     cfg.temperature)

    if cfg.plot and cfg.sweep:
        plot_sweep(results["sweep"], cfg.plot, name)
        report.notes.append(f"plot written to {cfg.plot}")
    if cfg.json_path:
        cfg.json_path.write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
    return report


def plot_sweep(sweep: dict[str, list], path: Path, model: str) -> None:
    """Aggregate tokens/s against concurrent clients, ours and the serial server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(sweep["clients"], sweep["ours"], "o-", label="dhllm (continuous batching)")
    ax.plot(sweep["clients"], sweep["serial"], "s--", label="serial (chapter-style)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sweep["clients"], [str(c) for c in sweep["clients"]])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"{Path(model).name}: throughput vs concurrency (one run)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def format_table(report: BenchReport) -> str:
    """The headline figures as a text table."""
    r = report.results
    clients = report.config.get("clients") or [1, 8]
    low_label, high_label = f"{min(clients)} client(s)", f"{max(clients)} clients"
    lines = [f"{'aggregate tokens/s':<34}{low_label:>12}{high_label:>12}{'ratio':>8}"]
    labels = [("ours", "dhllm (continuous batching)"), ("serial", "serial chapter-style"),
              ("transformers_serve", "transformers serve"),
              ("transformers_serve_cb", "transformers serve --cont.-batch.")]
    for key, label in labels:
        if key not in r:
            continue
        row = r[key]
        nums = [k for k in row if k.isdigit()]
        low, high = min(nums, key=int), max(nums, key=int)
        lines.append(f"{label:<34}{row[low]['tokens_per_s']:>10.1f}/s"
                     f"{row[high]['tokens_per_s']:>10.1f}/s{row['ratio']:>7.2f}x")
    if "overhead" in r:
        o = r["overhead"]
        lines.append(f"direct model.generate, 1 stream: {o['direct_tokens_per_s']:.1f} tokens/s; "
                     f"through the server: {o['server_vs_direct']:.2f}x of it")
    if "ours" in r:
        one = r["ours"][str(min(clients))]
        lines.append(f"time to first token ({min(clients)} client(s)): {one['ttft_p50'] * 1000:.0f} ms; "
                     f"full reply: {one['full_p50']:.2f} s")
    if "health_ms_under_load" in r:
        h = r["health_ms_under_load"]
        lines.append(f"/health while {h['clients']} clients generate: p50 {h['p50']:.1f} ms, "
                     f"p99 {h['p99']:.1f} ms ({h['samples']} probes)")
    if "offline_engines" in r:
        lines.append("offline engines (tokens/s): " + ", ".join(
            f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in r["offline_engines"].items()))
    if "sweep" in r:
        s = r["sweep"]
        lines.append("sweep clients " + " ".join(f"{c:>7}" for c in s["clients"]))
        lines.append("  dhllm       " + " ".join(f"{v:>7.1f}" for v in s["ours"]))
        lines.append("  serial      " + " ".join(f"{v:>7.1f}" for v in s["serial"]))
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def main(cfg: BenchConfig) -> BenchReport:
    """Run, then print the table and the JSON of the same run."""
    report = run_bench(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(report))
    print(json.dumps(asdict(report), indent=2))
    return report
