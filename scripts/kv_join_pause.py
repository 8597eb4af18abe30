"""How long running streams wait while a newcomer joins: ``SlotKV.join`` against the old copy.

``OLD=/checkout/of/8ce40c0 python scripts/kv_join_pause.py`` (any commit before the slots): KV
shaped like the embedded model's (30 layers, 3 KV heads of 64, float32), random; running rows of
one length, one newcomer. The old engine built a new rectangle for every join (``merge_rows`` in that
checkout's ``helpers/server/engine/kv.py``); the slots write the newcomer's row into a free slot.
Each case twice, in a worker thread as the engine runs it. Run it under the heavy lock.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from helpers.server.engine.kv_slots import SlotKV, SlotLimits

LAYERS, HEADS, DIM = 30, 3, 64
CASES = ((7, 100, 100), (7, 1000, 1000), (7, 1000, 1500), (15, 2000, 500))


def group(rows: int, width: int) -> tuple[DynamicCache, torch.Tensor]:
    """Random KV of ``rows`` rows of ``width`` tokens, and their mask."""
    layers = [(torch.randn(rows, HEADS, width, DIM), torch.randn(rows, HEADS, width, DIM))
              for _ in range(LAYERS)]
    return DynamicCache(ddp_cache_data=layers), torch.ones((rows, width), dtype=torch.long)


def pause(running: int, width: int, new_width: int, merge_rows: object) -> None:
    """One newcomer joins ``running`` rows: the old copy's time and the slots' time."""
    cache, mask = group(running, width)  # what the old engine copies
    new_cache, new_mask = group(1, new_width)
    started = time.perf_counter()
    merge_rows(cache, mask, new_cache, new_mask)  # type: ignore[operator]
    old = time.perf_counter() - started
    # One row more than running, then it leaves: the newcomer finds its slot free.
    first, first_mask = group(running + 1, width)
    slots = SlotKV.for_group(first, width, 256, SlotLimits(64, 10**9))
    _, batch_mask = slots.keep(list(range(running)), slots.join(first, first_mask, None, 256))
    started = time.perf_counter()
    slots.join(new_cache, new_mask, batch_mask, 256)
    new = time.perf_counter() - started
    print(f"{running} rows x {width} tokens, a newcomer of {new_width}: "
          f"old copy {old * 1000:7.1f} ms, slots {new * 1000:6.1f} ms", flush=True)


def main() -> None:
    """Every case twice, with the old checkout's ``merge_rows``."""
    path = Path(os.environ["OLD"]) / "helpers" / "server" / "engine" / "kv.py"
    spec = importlib.util.spec_from_file_location("old_kv", path)
    old_kv = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(old_kv)  # type: ignore[union-attr]
    for case in CASES:
        for _ in range(2):
            pause(*case, old_kv.merge_rows)


if __name__ == "__main__":
    worker = threading.Thread(target=main)  # the engine joins rows in its worker thread
    worker.start()
    worker.join()
