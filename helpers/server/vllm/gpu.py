"""Whether vLLM can start on this machine's GPUs: it takes a share of each GPU's memory up front.

vLLM reserves ``--gpu-memory-utilization`` of a GPU's *total* memory for itself (default 0.92
in vLLM 0.32, ``vllm/config/cache.py``; 0.9 in earlier releases) and refuses to start when less
than that is free (``vllm/v1/worker/utils.py``: "Free memory on device ... on startup is less
than desired GPU memory utilization"). A model that another kernel (or this one) still holds makes that happen: say so
before a minute of start-up, not after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_UTILIZATION = 0.92  # vLLM 0.32's default --gpu-memory-utilization
# vLLM measures free memory after creating its own CUDA context (~0.3-0.5 GiB, see
# helpers.hardware.MARGIN_GIB), which is not free any more by then.
CONTEXT_MIB = 512


@dataclass(frozen=True)
class GpuMemory:
    """One GPU as ``nvidia-smi`` reports it, in MiB."""

    index: str
    free_mib: float
    total_mib: float


def gpu_memory(timeout: float = 20.0) -> list[GpuMemory]:
    """Free and total memory of every GPU (``nvidia-smi``; no CUDA context is created), or []."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        result = subprocess.run(
            [exe, "--query-gpu=index,memory.free,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for row in result.stdout.splitlines() if result.returncode == 0 else []:
        parts = [p.strip() for p in row.split(",")]
        try:
            gpus.append(GpuMemory(parts[0], float(parts[1]), float(parts[2])))
        except (IndexError, ValueError):
            continue  # "[N/A]" and the like: not a figure to decide on
    return gpus


def requested_utilization(args: Sequence[str]) -> float:
    """The ``--gpu-memory-utilization`` in vLLM's arguments, else vLLM's default."""
    for i, arg in enumerate(args):
        if arg == "--gpu-memory-utilization" and i + 1 < len(args):
            return float(args[i + 1])
        if arg.startswith("--gpu-memory-utilization="):
            return float(arg.split("=", 1)[1])
    return DEFAULT_UTILIZATION


def vllm_gpu_problem(args: Sequence[str] = (), gpus: Sequence[GpuMemory] | None = None,
                     count: int = 1) -> str | None:
    """Why vLLM cannot start on the first ``count`` visible GPUs (in Chinese), or None.

    None without a GPU too (vLLM's CPU build reserves RAM instead). ``gpus``: as
    ``gpu_memory()`` reports them (the default reads it now).
    """
    gpus = gpu_memory() if gpus is None else list(gpus)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # vLLM sees these, in this order
        by_index = {g.index: g for g in gpus}
        gpus = [by_index[i.strip()] for i in visible.split(",") if i.strip() in by_index]
    utilization = requested_utilization(args)
    for gpu in gpus[:count]:
        need = utilization * gpu.total_mib + CONTEXT_MIB
        if gpu.free_mib < need:
            return (f"GPU {gpu.index} 只有 {gpu.free_mib / 1024:.1f} GiB 空闲（共 {gpu.total_mib / 1024:.1f}"
                    f" GiB），而 vLLM 启动时要先占用 {utilization:.0%} 的显存，再加上它自己的 CUDA 上下文，"
                    f"约 {need / 1024:.1f} GiB。先释放占着显存的模型：关掉其他 notebook 的内核"
                    f"（Kernel → Shut Down Kernel），或者用 nvidia-smi 看是哪个进程占着；"
                    f"也可以在 DHLLM_VLLM_ARGS 里用 --gpu-memory-utilization 调小比例。")
    return None
