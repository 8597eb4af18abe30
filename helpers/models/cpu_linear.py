"""Faster matrix products for a float32 model on a CPU: oneDNN with weights packed once.

A decode step multiplies a few rows (one per running request) by every weight matrix. PyTorch's
CPU wheels send ``nn.Linear`` to MKL's sgemm, which is slow at a few rows on some CPUs. On this
project's 2-core AMD EPYC (AVX2), measured 2026-12-07 in a worker thread (where the engine runs
the model): 8 rows x [1536, 576] took 361 us with ``F.linear`` and 222 us with oneDNN on a
packed weight; the embedded model's output layer ([49152, 576]) 17.4 against 6.5 ms at 8 rows
and 8.1 against 4.5 ms at 1 row. But one row through a small packed layer took 166 us against
97 us (a fixed cost per oneDNN call in a thread that is not the main one), so one or two rows
go through a small layer as before (``MIN_ROWS``, ``MIN_OUT_FEATURES``). vLLM's CPU build uses
oneDNN linear kernels too. PyTorch exposes them as ``torch.ops.mkldnn`` (``_reorder_linear_weight``
packs, ``_linear_pointwise`` multiplies): what ``torch.compile``'s CPU backend uses after
freezing. No maintained library packs an eager ``nn.Linear``, hence this.

Each packed layer keeps its original weight (other code may read it: tied embeddings, saving,
``.to()``), so the weights take twice their memory: packing is skipped past ``MAX_PACKED_BYTES``.
Where the kernels are missing or disagree with ``F.linear`` on a first check, nothing changes.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
MAX_PACKED_BYTES = 2 << 30  # the copies' memory; a 0.5 B model in float32 needs ~2 GiB
_ROWS_HINT = 8  # oneDNN picks its layout for this many rows; other counts work too
MIN_ROWS = 3  # fewer rows go through F.linear (MKL), unless the layer is this wide:
MIN_OUT_FEATURES = 8192  # an output layer (a vocabulary) gains at any row count


def pack_cpu_linears(model: Any) -> int:
    """Route the float32 CPU ``nn.Linear`` layers of ``model`` through packed oneDNN; how many."""
    import torch

    layers = [m for m in model.modules()
              if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
              and m.weight.dtype == torch.float32 and not hasattr(m, "packed_weight")]
    size = sum(m.weight.numel() * 4 for m in layers)
    if not layers or size > MAX_PACKED_BYTES or not _kernels_agree():
        return 0
    for layer in layers:
        layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(),
                                                                       _ROWS_HINT)
        layer.forward = _PackedForward(layer)
    log.info("packed %d linear layers for oneDNN (%.0f MiB)", len(layers), size / 2**20)
    return len(layers)


class _PackedForward:
    """A packed layer's forward: oneDNN when no gradient is wanted, ``F.linear`` otherwise."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def __call__(self, x: Any) -> Any:
        import torch

        layer = self.layer
        if (torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu"
                or (x.numel() < MIN_ROWS * layer.in_features
                    and layer.out_features < MIN_OUT_FEATURES)):
            return torch.nn.functional.linear(x, layer.weight, layer.bias)
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, layer.bias, "none",
                                                  [], "")


def _kernels_agree() -> bool:
    """True where packing and the packed product exist and match ``F.linear`` on random data."""
    import torch

    try:
        if not torch.backends.mkldnn.is_available():
            return False
        weight, bias = torch.randn(48, 32), torch.randn(48)
        x = torch.randn(3, 5, 32)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return bool(torch.allclose(got, torch.nn.functional.linear(x, weight, bias),
                                   rtol=1e-4, atol=1e-4))
    except (RuntimeError, AttributeError, TypeError) as exc:  # an older or different build
        log.info("oneDNN packed linear unavailable here (%s); keeping F.linear", exc)
        return False
