"""One OpenMP team at a time: free the idle threads a thread's earlier tensor work left behind.

PyTorch's CPU kernels run on OpenMP, and OpenMP keeps one team of helper threads for *each*
thread that ever ran a parallel kernel. When the model was loaded or run in the main thread, and
then the engine runs it in its worker thread, the process holds two teams. libgomp (the OpenMP of
PyTorch's Linux wheels) then counts more threads than CPUs, and its idle threads spin 100 times
instead of 300000 before they sleep (GCC's libgomp manual, GOMP_SPINCOUNT), so the ~1000
kernels of a decode step pay wake-ups.
``scripts/openmp_teams.py`` on this project's 2 cores, 2026-12-07, one 8-row decode step of
the embedded model in a worker thread after the main thread loaded and packed it (medians of
three rounds): 136 ms, 137 ms when the main thread had also run the model, 85 ms once the main
thread called ``omp_pause_resource_all``. vLLM does not meet this: its engine runs in a process
of its own. No library frees another thread's team, hence this.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

_OMP_PAUSE_SOFT = 1  # OpenMP 5.0's omp_pause_soft: threads are freed, state kept
_runtime: Any = None  # the OpenMP library torch uses, once found (False: none)


def release_openmp_threads() -> bool:
    """Free the idle OpenMP team of the calling thread (a no-op without one); True if freed.

    Call it in the thread that loaded or ran the model (the notebook's, the CLI's main thread)
    before another thread takes over the model's work. The team comes back, at the cost of one
    thread start, the next time this thread runs a parallel kernel.
    """
    runtime = _openmp_runtime()
    if not runtime:
        return False
    try:
        return runtime.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0
    except (AttributeError, OSError):  # an OpenMP older than 5.0
        return False


def _openmp_runtime() -> Any:
    """The OpenMP library loaded with torch (libgomp, libiomp5md or libomp), or False."""
    global _runtime
    if _runtime is None:
        _runtime = _find_runtime() or False
    return _runtime


def _find_runtime() -> Any:
    import torch

    if not torch.backends.openmp.is_available():
        return None
    lib = Path(torch.__file__).parent / "lib"
    names = ("libgomp*.so*", "libiomp5*.so", "libomp*.so*") if sys.platform.startswith("linux") \
        else ("libiomp5md.dll", "libomp*.dll", "vcomp*.dll") if sys.platform == "win32" \
        else ("libomp*.dylib", "libiomp5*.dylib")
    # Only a copy that torch ships (and has loaded): another copy would have no team to free.
    for path in sorted(p for pattern in names for p in lib.glob(pattern)):
        try:
            found = ctypes.CDLL(str(path))
        except OSError:
            continue
        if hasattr(found, "omp_pause_resource_all"):
            return found
    try:  # a torch built against the system's OpenMP (conda, distributions): already loaded
        found = ctypes.CDLL(None)
        return found if hasattr(found, "omp_pause_resource_all") else None
    except (OSError, TypeError):  # Windows has no process-wide handle
        return None
