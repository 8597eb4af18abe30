"""What the machine offers (a CUDA GPU: memory, compute capability) and what a model needs there.

Pure numbers, no registry and no network: ``helpers.models.choice`` combines them.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30

# Bytes per parameter of the weights in memory. 16-bit and fp32 are exact. 8-bit and 4-bit are
# Linly-7B's sizes with bitsandbytes (6.5 GiB and 3.9 GiB for 6.74 B params, shared/FACTS.md) per
# parameter: above 1 and 0.5 because the embeddings, lm_head and norms stay 16-bit and the
# quantization scales take room. For small models (embeddings a larger share) 4-bit is
# underestimated, which matters little: they fit in 16-bit anyway.
BYTES_PER_PARAM: dict[str, float] = {
    "float32": 4.0,
    "float16": 2.0,
    "bfloat16": 2.0,
    "8bit": 1.035,
    "4bit": 0.62,
}

# A short chat: a system prompt, a few turns and a 256-token answer fit in 2k tokens.
CONTEXT_TOKENS = 2048

# CUDA context (~0.3-0.5 GiB for torch's kernels, counted in total_memory), the activations of a
# 2k-token prefill (~0.1-0.2 GiB for a 7B model with SDPA; generate keeps only the last logits)
# and allocator slack.
MARGIN_GIB = 0.75


def compute_dtype(capability: tuple[int, int]) -> str:
    """The 16-bit dtype a CUDA device computes in: bf16 from Ampere (cc 8.0) on, else fp16.

    ``torch.cuda.is_bf16_supported()`` says True on a T4 (7.5), which only emulates bf16, slowly.
    """
    return "bfloat16" if capability[0] >= 8 else "float16"


@dataclass(frozen=True)
class Gpu:
    """The first CUDA device as torch reports it."""

    name: str
    memory_gib: float
    capability: tuple[int, int]

    @property
    def dtype(self) -> str:
        """The 16-bit dtype to compute in on this GPU (see ``compute_dtype``)."""
        return compute_dtype(self.capability)

    def describe(self) -> str:
        """``Tesla T4（14.7 GiB，算力 7.5）``: name, memory and compute capability."""
        major, minor = self.capability
        return f"{self.name}（{self.memory_gib:.1f} GiB，算力 {major}.{minor}）"


def detect_gpu() -> Gpu | None:
    """The first CUDA device, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    memory = torch.cuda.get_device_properties(0).total_memory / GIB
    major, minor = torch.cuda.get_device_capability(0)
    return Gpu(torch.cuda.get_device_name(0), memory, (int(major), int(minor)))


def estimate_gib(
    params_b: float,
    kv_kib_per_token: float,
    precision: str,
    context_tokens: int = CONTEXT_TOKENS,
) -> float:
    """Memory to run a model: weights + KV cache for ``context_tokens`` + a fixed margin."""
    weights = params_b * 1e9 * BYTES_PER_PARAM[precision] / GIB
    # The KV cache is kept in the compute dtype, 16-bit even when the weights are quantized.
    kv_scale = 2.0 if precision == "float32" else 1.0
    kv = kv_kib_per_token * 1024 * context_tokens * kv_scale / GIB
    return weights + kv + MARGIN_GIB
