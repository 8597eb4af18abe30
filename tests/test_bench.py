"""The benchmark's code path on the tiny model with tiny settings (figures are not checked)."""

from __future__ import annotations

import json

from helpers.bench import BenchConfig, format_table, run_bench
from helpers.cli import bind_warning
from helpers.client import iter_sse_data


def test_bench_runs_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    plot, out = tmp_path / "throughput.png", tmp_path / "bench.json"
    cfg = BenchConfig.quick(model=str(tiny_model_dir), tokens=4, sweep=(1, 2), builtin=True,
                            plot=plot, json_path=out)
    report = run_bench(cfg, log=lambda _: None)
    results = report.results
    assert not report.notes or all("plot" in n for n in report.notes), report.notes
    for key in ("ours", "serial"):
        assert results[key]["1"]["tokens"] > 0 and results[key]["2"]["tokens"] > 0
        assert results[key]["1"]["errors"] == results[key]["2"]["errors"] == 0
        assert results[key]["ratio"] > 0
    persona, pause = results["ours"]["persona"], results["ours"]["pause"]
    assert persona["turns"] == 2 and len(persona["ttft"]) == 2 and persona["first"] > 0
    assert pause["median_gap"] > 0 and pause["longest_pause"] > 0 and pause["long_prompt_ttft"] > 0
    assert results["health_ms_under_load"]["samples"] >= 1
    assert results["overhead"]["direct_tokens_per_s"] > 0
    assert "ours_2" in results["offline_engines"]
    assert results["sweep"]["clients"] == [1, 2] and len(results["sweep"]["serial"]) == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.with_name("ttft_by_turn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out.read_text())["results"]["ours"]["ratio"] == results["ours"]["ratio"]
    table = format_table(report)
    assert "dhllm (continuous batching)" in table and "serial chapter-style" in table
    assert "longest pause" in table and "first sentence" in table


def test_first_sentence_is_when_a_tts_client_gets_one_and_sse_lines():
    from helpers.bench.load import Reply, _add_piece

    reply = Reply()
    for at, piece in enumerate(["Pi is 3", ".14 today", ". And", " more"]):
        _add_piece(reply, piece, float(at), None)
    assert reply.first_sentence == 2.0  # "Pi is 3.14 today. " is whole once "And" starts
    lines = [b"data: {\"a\": 1}", b"", b": comment", "data:[DONE]", b"event: x"]
    assert list(iter_sse_data(lines)) == ['{"a": 1}', "[DONE]"]


def test_serve_warns_on_an_open_bind_without_a_key():
    assert "API key" in bind_warning("0.0.0.0", None)
    assert bind_warning("0.0.0.0", "key") is None
    assert bind_warning("127.0.0.1", None) is None
