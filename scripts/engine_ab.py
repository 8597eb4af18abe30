"""The builtin engine against bare vLLM CPU, in turns (A B A B).

``python scripts/engine_ab.py [ROUNDS]``: each server in its own process answers 1 and 8 clients
of 48 tokens at temperature 0.7, 8 clients with the chapter's sampling and 8 of 256 tokens, with
the bench's own ``run_load``; prints each round, then tokens/s over all rounds.
``OLD=/another/checkout`` adds that checkout's engine as a server, ``MKL=1`` this engine without
packed oneDNN linears. Run it under the heavy lock on a shared machine; vLLM's compile cache
should be warm (a first ``dhllm bench --peers vllm``).
"""

from __future__ import annotations

import os
import sys

import requests

from helpers.bench import CHAPTER_SAMPLING
from helpers.bench.load import run_load
from helpers.bench.peers import PeerRequest, VLLMPeer, dhllm_process
from helpers.embedded import embedded_model_dir

TOKENS = 48
# (label, clients, new tokens, sampling): "8 x 256" lets each row's KV grow five times longer.
LOADS = (("1", 1, TOKENS, None), ("8", 8, TOKENS, None), ("8 chapter", 8, TOKENS, CHAPTER_SAMPLING),
         ("8 x 256", 8, 256, None))


def servers(req: PeerRequest) -> dict:
    """How to start each server under comparison."""
    found = {
        "dhllm": lambda: dhllm_process(req),
        "vLLM": lambda: VLLMPeer(req),
    }
    if os.environ.get("MKL"):
        found["dhllm MKL"] = lambda: dhllm_process(req, env={"DHLLM_CPU_PACKED_LINEAR": "0"})
    if os.environ.get("OLD"):
        found["dhllm OLD"] = lambda: dhllm_process(req, env={"PYTHONPATH": os.environ["OLD"]})
    return found


def main(rounds: int) -> None:
    """Interleaved rounds; the merged tokens/s per server and load."""
    req = PeerRequest("embedded", str(embedded_model_dir()), "embedded", TOKENS)
    totals: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for rnd in range(rounds):
        for name, start in servers(req).items():
            handle = start().wait(600)
            try:
                model = requests.get(handle.url + "/v1/models", timeout=10).json()["data"][0]["id"]
                run_load(handle.url, 8, 1, 8, 0.7, model)  # warm-up
                for label, clients, tokens, sampling in LOADS:
                    r = run_load(handle.url, clients, 1, tokens, 0.7, model, sampling=sampling)
                    totals.setdefault(name, {}).setdefault(label, []).append((r.tokens, r.seconds))
                    print(f"round {rnd + 1} {name:13s} {label:9s}: {r.tokens_per_s:6.1f} tok/s, "
                          f"errors {r.errors}", flush=True)
            finally:
                handle.stop()
    for name, by_load in totals.items():
        print(name, {k: round(sum(t for t, _ in v) / sum(s for _, s in v), 1)
                     for k, v in by_load.items()})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
