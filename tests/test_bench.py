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
        room = results[key]["classroom"]
        assert room["clients"] == 3 and room["errors"] == 0 and room["tokens"] > 0
        assert room["full_p95"] >= room["full_p50"] > 0
        chapter = results[key]["chapter"]  # POST /'s sampling, sent to /v1
        assert chapter["clients"] == 2 and chapter["errors"] == 0 and chapter["tokens"] > 0
        assert results[key]["chapter_vs_plain"] > 0
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
    assert "longest pause" in table and "first sentence" in table and "3 at once" in table
    assert "chapter sampling, 2 clients" in table


def test_servers_take_turns_round_after_round(monkeypatch):
    """A B A B, each start in a process of its own; the rounds' figures are merged."""
    import helpers.bench as bench
    from helpers.bench import BenchReport, LoadResult, Peer, PeerRequest

    events: list[str] = []

    class FakeHandle:
        url, model = "http://127.0.0.1:9", "m"

        def __init__(self, name: str) -> None:
            self.name = name
            events.append(f"start {name}")

        def wait(self, timeout: float = 0) -> FakeHandle:
            return self

        def stop(self) -> None:
            events.append(f"stop {self.name}")

    def fake_load(handle, cfg):
        events.append(f"load {handle.name}")
        speed = 10.0 if handle.name == "a" else 20.0
        return {str(n): LoadResult(n, int(speed * (len(events))), 1.0, 0.1, 1.0, fulls=[1.0])
                for n in cfg.clients}

    peers = {name: Peer(name, name.upper(), lambda req, name=name: FakeHandle(name))
             for name in ("a", "b")}
    monkeypatch.setattr(bench, "PEERS", peers)
    monkeypatch.setattr(bench, "measure_load", fake_load)
    monkeypatch.setattr(bench, "measure_latency", lambda handle, cfg: {})
    cfg = BenchConfig.quick(repeats=2, clients=(1, 2))
    report = BenchReport(config={})
    bench.run_interleaved(["a", "b", "nope"], PeerRequest("m", "d", "m", 4), cfg, report,
                          log=lambda _: None)
    assert [e for e in events if e.startswith("load")] == ["load a", "load b", "load a", "load b"]
    assert events[:3] == ["start a", "load a", "stop a"]  # one server at a time
    a = report.results["a"]["2"]
    assert a["rounds_tokens_per_s"] == [20.0, 80.0] and a["tokens"] == 100  # 2nd and 8th event
    assert a["tokens_per_s"] == a["tokens"] / a["seconds"]
    assert any("nope" in n for n in report.notes)


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


def test_the_bench_runs_our_server_with_its_own_defaults(tiny_model_dir):
    """The "dhllm" peer is ``dhllm serve`` as a user starts it (the KV budget sizes the batch);
    only the serial baseline pins one row. The process's real environment tells (psutil)."""
    import time

    import psutil

    from helpers.bench.peers import PEERS, PeerRequest

    def environment(pid: int) -> dict[str, str]:
        # Popen returns once exec has begun; the kernel records the new environment a moment
        # later (an empty read under load failed CI). Every peer gets HF_HUB_OFFLINE=1, so wait
        # for it: an empty read can then neither fail "serial" nor pass "dhllm" by accident.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pairs = psutil.Process(pid).environ()
            if pairs.get("HF_HUB_OFFLINE") == "1":
                return pairs
            time.sleep(0.05)
        raise AssertionError(f"process {pid} never showed its environment")

    req = PeerRequest(str(tiny_model_dir), str(tiny_model_dir), "tiny", 4)
    for name, expected in [("dhllm", None), ("serial", "1")]:
        server = PEERS[name].start(req)
        try:
            assert environment(server.proc.pid).get("DHLLM_MAX_BATCH_SIZE") == expected, name
        finally:
            server.stop()
