"""Where an 8-row decode step of the builtin engine spends its time (embedded SmolLM2-135M).

Wraps the engine's parts with timers, runs 8 streams of 48 tokens twice (plain sampling, then
the chapter's top_k 20 and repetition_penalty 1.15) and prints each part's total and per-call
time. Run it under the heavy lock on a shared machine:
``flock /tmp/dhllm-heavy.lock python scripts/engine_step_profile.py``.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

from helpers.chat import GenerationParams, TransformersChat
from helpers.server.engine import BatchingEngine
from helpers.server.engine import kv_manager as km

TOTAL: collections.defaultdict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter[str] = collections.Counter()


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, adding its wall time to ``TOTAL[name]``."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTAL[name] += time.perf_counter() - started
            CALLS[name] += 1
    return wrapper


def main() -> None:
    """Profile plain and chapter sampling at 8 streams; the second of two runs is printed."""
    engine = BatchingEngine(TransformersChat.load("embedded", verbose=False), max_batch_size=8)
    runner = engine.runner
    runner.forward = timed("forward (model)", runner.forward)  # type: ignore[method-assign]
    runner.pick = timed("sampling (pick)", runner.pick)  # type: ignore[method-assign]
    runner.decode = timed("decode step", runner.decode)  # type: ignore[method-assign]
    km.RunningBatch.decode_inputs = timed("decode inputs", km.RunningBatch.decode_inputs)  # type: ignore[method-assign]
    engine._emit_and_prune = timed("emit, detokenize, prune", engine._emit_and_prune)  # type: ignore[method-assign]
    km.SlotKV.join = timed("join (SlotKV.join)", km.SlotKV.join)  # type: ignore[method-assign]
    km.SlotKV.keep = timed("leave (SlotKV.keep)", km.SlotKV.keep)  # type: ignore[method-assign]
    engine._step = timed("whole step", engine._step)  # type: ignore[method-assign]
    engine.start()
    runs = {"plain": GenerationParams(max_new_tokens=48, temperature=0.7),
            "chapter": GenerationParams(max_new_tokens=48, temperature=0.7, top_k=20,
                                        repetition_penalty=1.15)}
    try:
        for label, params in runs.items():
            for _ in range(2):  # the first run warms up
                TOTAL.clear()
                CALLS.clear()
                started, tokens = time.perf_counter(), 0
                streams = [engine.submit([{"role": "user", "content": "Tell me a short story "
                                           f"about a brave little robot. ({i})"}], params)
                           for i in range(8)]
                for stream in streams:
                    list(stream)
                    tokens += stream.finish.completion_tokens if stream.finish else 0
                wall = time.perf_counter() - started
            print(f"== {label}: 8 streams x 48 tokens: {tokens / wall:.1f} tok/s, {wall:.2f} s")
            for name in sorted(TOTAL, key=TOTAL.__getitem__, reverse=True):
                print(f"  {name:26s} {TOTAL[name] * 1000:8.1f} ms  "
                      f"{TOTAL[name] / CALLS[name] * 1000:7.2f} ms/call ({CALLS[name]} calls)")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
