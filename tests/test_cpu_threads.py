"""helpers/models/cpu_threads.py: the calling thread's idle OpenMP team is freed, comes back when
needed, and the engine frees the team that loading and packing the model left in its caller.

Each case runs in a fresh Python: pytest's own process has run kernels in many threads. Threads
are counted in /proc (Linux): the speed this buys is the benchmark's to show (docs/engine_step.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.models.cpu_threads import _openmp_runtime

CPUS = os.cpu_count() or 1
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or CPUS < 2 or not _openmp_runtime(),
    reason="needs Linux's /proc, two or more CPUs and an OpenMP runtime with pause")

COUNT = "import os\ndef threads(): return len(os.listdir('/proc/self/task'))\n"


def run(code: str, *args: str) -> list[str]:
    # pytest-xdist's workers run with OMP_NUM_THREADS=1: one thread has no team to free.
    env = {**os.environ, "OMP_NUM_THREADS": str(CPUS)}
    done = subprocess.run([sys.executable, "-c", COUNT + code, *args], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_the_team_is_freed_and_comes_back_when_needed() -> None:
    team, freed, freed_again, back, total, threads = run(
        "import torch\n"
        "from helpers.models.cpu_threads import release_openmp_threads\n"
        "x = torch.ones(1 << 22)\n"
        "(x + 1).sum()\n"  # a parallel kernel: this thread gets its team
        "team = threads()\n"
        "release_openmp_threads()\n"
        "freed = threads()\n"
        "release_openmp_threads()\n"  # nothing left: a no-op
        "freed_again = threads()\n"
        "total = int((x + 1).sum())\n"
        "print(team, freed, freed_again, threads(), total, torch.get_num_threads())\n")
    helpers = int(threads) - 1
    assert int(freed) == int(team) - helpers
    assert int(freed_again) == int(freed)
    assert int(back) == int(team)
    assert int(total) == 2 * (1 << 22)


def test_the_engine_leaves_its_caller_no_team(tiny_model_dir: Path) -> None:
    before, after, tokens = run(
        "import sys, torch\n"
        "from helpers.chat import GenerationParams, TransformersChat\n"
        "from helpers.models.cpu_threads import release_openmp_threads\n"
        "from helpers.server.engine import BatchingEngine\n"
        "chat = TransformersChat.load(sys.argv[1], verbose=False)\n"
        "chat.model(input_ids=torch.ones(4, 64, dtype=torch.long))\n"  # the learner's own call
        "engine = BatchingEngine(chat)\n"
        "engine.start()\n"
        "before = threads()\n"
        "release_openmp_threads()\n"
        "after = threads()\n"
        "stream = engine.submit([{'role': 'user', 'content': 'hi'}],\n"
        "                       GenerationParams(max_new_tokens=4, temperature=0.0))\n"
        "assert ''.join(stream)\n"
        "engine.stop()\n"
        "print(before, after, stream.finish.completion_tokens)\n", str(tiny_model_dir))
    assert before == after  # the engine had freed it: nothing was left to free
    assert int(tokens) == 4
