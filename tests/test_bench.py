"""The benchmark's code path on the tiny model with tiny settings (figures are not checked)."""

from __future__ import annotations

import json

from helpers.bench import BenchConfig, format_table, run_bench
from helpers.cli import bind_warning


def test_bench_runs_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    plot, out = tmp_path / "throughput.png", tmp_path / "bench.json"
    cfg = BenchConfig(model=str(tiny_model_dir), tokens=4, rounds=1, clients=(1, 2),
                      sweep=(1, 2), peers=(), builtin=True, plot=plot, json_path=out)
    report = run_bench(cfg, log=lambda _: None)
    results = report.results
    for key in ("ours", "serial"):
        assert results[key]["1"]["tokens"] > 0 and results[key]["2"]["tokens"] > 0
        assert results[key]["1"]["errors"] == results[key]["2"]["errors"] == 0
        assert results[key]["ratio"] > 0
    assert results["health_ms_under_load"]["samples"] >= 1
    assert results["overhead"]["direct_tokens_per_s"] > 0
    assert "ours_2" in results["offline_engines"]
    assert results["sweep"]["clients"] == [1, 2] and len(results["sweep"]["serial"]) == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out.read_text())["results"]["ours"]["ratio"] == results["ours"]["ratio"]
    table = format_table(report)
    assert "dhllm (continuous batching)" in table and "serial chapter-style" in table


def test_serve_warns_on_an_open_bind_without_a_key():
    assert "API key" in bind_warning("0.0.0.0", None)
    assert bind_warning("0.0.0.0", "key") is None
    assert bind_warning("127.0.0.1", None) is None
