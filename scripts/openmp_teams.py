"""What a second OpenMP team costs the engine's worker thread (helpers/models/cpu_threads.py).

``python scripts/openmp_teams.py [ROUNDS]``: one 8-row decode step of the embedded model (packed
as the engine packs it, 120 tokens of KV), timed in a worker thread, in turns:

- "loaded": the main thread loaded and packed the model (as ``BatchingEngine`` does), the
  worker runs it: loading alone already gives the main thread a team;
- "ran": the main thread also ran the model first (as a notebook does before it starts the
  server);
- "freed": the same, then the main thread called ``release_openmp_threads()``.

Each case runs in a fresh Python (a team, once made, stays for the process). Prints each round
and the median step per case. Run it under the heavy lock on a shared machine.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

CASES = ("loaded", "ran", "freed")
STEPS = 20

CHILD = """
import statistics, sys, threading, time, torch
from transformers import DynamicCache
from helpers.chat import TransformersChat
from helpers.models.cpu_linear import pack_cpu_linears
from helpers.models.cpu_threads import release_openmp_threads

case = sys.argv[1]
model = TransformersChat.load("embedded", verbose=False).model
pack_cpu_linears(model)
rows, width = 8, 120
ids = torch.randint(100, 1000, (rows, width))
mask = torch.ones((rows, width + 1), dtype=torch.long)

def step_times(out):
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=ids, attention_mask=mask[:, :-1], use_cache=True, past_key_values=cache,
              logits_to_keep=1)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        for _ in range({steps} + 3):
            cache = DynamicCache(ddp_cache_data=layers)  # the same 120 tokens every step
            started = time.perf_counter()
            model(input_ids=ids[:, :1], attention_mask=mask, use_cache=True,
                  past_key_values=cache, position_ids=torch.full((rows, 1), width),
                  logits_to_keep=1)
            out.append(time.perf_counter() - started)

if case != "loaded":
    step_times([])  # the main thread runs the model itself
if case == "freed":
    release_openmp_threads()
times = []
worker = threading.Thread(target=step_times, args=(times,))
worker.start()
worker.join()
print(statistics.median(times[3:]) * 1000)
""".replace("{steps}", str(STEPS))


def main(rounds: int) -> None:
    """Each case once per round, in turns; the medians."""
    found: dict[str, list[float]] = {case: [] for case in CASES}
    for rnd in range(rounds):
        for case in CASES:
            done = subprocess.run([sys.executable, "-c", CHILD, case], capture_output=True,
                                  text=True, check=True)
            ms = float(done.stdout.split()[-1])
            found[case].append(ms)
            print(f"round {rnd + 1} {case:6s}: {ms:6.1f} ms per 8-row step", flush=True)
    for case, values in found.items():
        print(f"{case:6s}: median {statistics.median(values):6.1f} ms "
              f"({', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
