"""The bench's output: one table of headline figures per server, and two plots (throughput
against concurrency, time to first token by conversation turn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers.bench.peers import PEERS


def _row(label: str, r: dict[str, Any], low: str, high: str, more: list[str]) -> str:
    one, many = r.get(low, {}), r.get(high, {})
    cells = [f"{one.get('tokens_per_s', 0):.1f}", f"{many.get('tokens_per_s', 0):.1f}",
             *(f"{r[c]['tokens_per_s']:.1f}" if c in r else "-" for c in more),
             f"{r.get('ratio', 0):.2f}x"]
    chapter = r.get("chapter")
    cells.append(f"{chapter['tokens_per_s']:.1f} ({r.get('chapter_vs_plain', 0):.2f}x)"
                 if chapter else "-")
    cells += [f"{one.get('ttft_p50', 0) * 1000:.0f} ms",
              f"{one.get('first_sentence_p50', 0) * 1000:.0f} ms"]
    room = r.get("classroom")
    cells.append(f"{room['full_p50']:.1f} / {room['full_p95']:.1f} s"
                 + (f" ({room['errors']} errors)" if room["errors"] else "") if room else "-")
    persona = r.get("persona")
    cells.append(f"{persona['first'] * 1000:.0f} -> {persona['last'] * 1000:.0f} ms"
                 if persona else "-")
    pause = r.get("pause")
    cells.append(f"{pause['longest_pause'] * 1000:.0f} / {pause['median_gap'] * 1000:.0f} ms "
                 f"({pause['ratio']:.1f}x)" if pause else "-")
    return "| " + " | ".join([label, *cells]) + " |"


def format_table(report: Any) -> str:
    """The headline figures as a Markdown table, then the other findings as lines."""
    r = report.results
    clients = report.config.get("clients") or [1, 8]
    low, high = str(min(clients)), str(8 if 8 in clients else max(clients))
    more = [str(c) for c in sorted(clients) if str(c) not in (low, high)]
    room = report.config.get("classroom") or 0
    chapter = report.config.get("chapter_clients") or high
    header = ["server", f"{low} client tok/s", f"{high} clients tok/s",
              *(f"{c} clients tok/s" for c in more), f"{high} vs {low}",
              f"chapter sampling, {chapter} clients tok/s (vs plain)", "TTFT short",
              "first sentence", f"{room} at once p50 / p95", "TTFT turn 1 -> last",
              "longest pause / median gap"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    labels = {peer.key: peer.label for peer in PEERS.values()}
    for key, row in r.items():
        if key in labels or key.startswith("peer:"):
            lines.append(_row(labels.get(key, key), row, low, high, more))
    lines += _rounds(r, labels, clients)
    lines += _details(r, low)
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _rounds(r: dict[str, Any], labels: dict[str, str], clients: list[int]) -> list[str]:
    """Tokens/s of each interleaved round: how much the machine drifted during the run."""
    lines = []
    for key, row in r.items():
        if key not in labels:
            continue
        runs = [f"{c} clients: " + " / ".join(f"{v:.1f}" for v in row[str(c)]["rounds_tokens_per_s"])
                for c in clients if len(row.get(str(c), {}).get("rounds_tokens_per_s", [])) > 1]
        if runs:
            lines.append(f"{labels[key]}, tok/s by round: " + "; ".join(runs))
    return lines


def _details(r: dict[str, Any], low: str) -> list[str]:
    lines = []
    if "overhead" in r:
        o = r["overhead"]
        lines.append(f"direct model.generate, 1 stream: {o['direct_tokens_per_s']:.1f} tokens/s; "
                     f"through the server: {o['server_vs_direct']:.2f}x of it")
    if "ours" in r and low in r["ours"]:
        lines.append(f"dhllm full reply ({low} client): {r['ours'][low]['full_p50']:.2f} s")
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
        for key in ("ours", "serial"):
            if s.get(key):
                lines.append(f"  {key:<11} " + " ".join(f"{v:>7.1f}" for v in s[key]))
    return lines


LABELS = {"ours": "dhllm (continuous batching)", "serial": "serial (chapter-style)",
          "transformers_serve": "transformers serve",
          "transformers_serve_cb": "transformers serve --continuous-batching",
          "vllm": "vLLM (bare)", "dhllm_vllm": "dhllm --engine vllm"}


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4), dpi=120)


def _save(fig: Any, ax: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(results: dict[str, Any], path: Path, model: str) -> None:
    """Aggregate tokens/s against concurrent clients: the sweep (ours, serial) as lines, every
    other server of the same run at its 1- and 8-client points."""
    fig, ax = _figure()
    sweep = results.get("sweep", {})
    for key, style in (("ours", "o-"), ("serial", "s--")):
        if sweep.get(key):
            ax.plot(sweep["clients"], sweep[key], style, label=LABELS[key])
    for key, r in results.items():
        if key in LABELS and key not in sweep and isinstance(r, dict):
            points = sorted((int(c), v["tokens_per_s"]) for c, v in r.items()
                            if c.isdigit() and isinstance(v, dict))
            if points:
                ax.plot(*zip(*points, strict=True), "^:", label=LABELS[key])
    clients = sweep.get("clients") or [1, 8]
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"{Path(model).name}: throughput vs concurrency (one run)")
    _save(fig, ax, path)


def plot_turns(results: dict[str, Any], path: Path, model: str) -> None:
    """Time to first token at each turn of the persona conversation, per server."""
    fig, ax = _figure()
    for key, r in results.items():
        ttft = r.get("persona", {}).get("ttft") if isinstance(r, dict) else None
        if key in LABELS and ttft:
            ax.plot(range(1, len(ttft) + 1), [t * 1000 for t in ttft], "o-", label=LABELS[key])
    ax.set_yscale("log")
    ax.set_xlabel("turn of the conversation (~600-token persona, history grows)")
    ax.set_ylabel("time to first token (ms, log scale)")
    ax.set_title(f"{Path(model).name}: waiting for the first word (one run)")
    _save(fig, ax, path)
