"""Chunked prefill of newcomers, starting from their cached prefixes (KV surgery: kv.py).

A group of new prompts is prefilled together, ``chunk_tokens`` at a time, between decode steps
of the running batch, so a long prompt no longer freezes every running stream. Layout of the
group's KV columns (row i has ``c_i`` cached tokens and ``s_i`` new ones):

    [ pad | cached c_i ][ pad | new s_i ]
    <----- P = max c --><---- S = max s --->

Both parts are right-aligned, so every row's last prompt token sits in the last column (one
``logits_to_keep=1`` gives every row's next-token logits). The padding in the middle is masked
out by the 2-D attention mask, and position ids count real tokens only, so each row sees the
positions it would see alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Forward = Callable[[Any, Any, Any, Any], Any]  # (input_ids, mask, positions, cache) -> logits


class PrefillGroup:
    """New prompts being prefilled together, chunk by chunk, until their KV can join the batch."""

    def __init__(self, prompts: Sequence[Sequence[int]], cached: Sequence[tuple[int, Any]],
                 pad_id: int, device: Any) -> None:
        import torch

        self.size = len(prompts)  # rows in the group
        new = [len(ids) - c for ids, (c, _) in zip(prompts, cached, strict=True)]
        width = max(new)
        self.input_ids = torch.full((self.size, width), pad_id, dtype=torch.long)
        self.new_mask = torch.zeros((self.size, width), dtype=torch.long)
        self.positions = torch.zeros((self.size, width), dtype=torch.long)
        for i, (ids, (c, _)) in enumerate(zip(prompts, cached, strict=True)):
            self.input_ids[i, width - new[i]:] = torch.tensor(ids[c:])
            self.new_mask[i, width - new[i]:] = 1
            self.positions[i, width - new[i]:] = torch.arange(c, len(ids))
        self.input_ids, self.new_mask, self.positions = (
            t.to(device) for t in (self.input_ids, self.new_mask, self.positions))
        self.cache, self.mask = _cached_part(cached, self.size, device)
        self.done = 0  # columns of the new part already prefilled

    @property
    def remaining(self) -> int:
        """Prompt tokens (with padding) still to prefill: what the next chunks cost."""
        return (self.width - self.done) * self.size

    @property
    def width(self) -> int:
        """Columns of new tokens in all (the longest new part)."""
        return self.input_ids.shape[1]

    def step(self, forward: Forward, chunk_tokens: int) -> Any:
        """Prefill the next chunk; the last column's logits once the prompts are done, else None."""
        import torch

        columns = max(1, chunk_tokens // self.size)  # cost grows with rows x columns
        a, b = self.done, min(self.done + columns, self.width)
        mask = torch.cat([self.mask, self.new_mask[:, a:b]], dim=1)
        logits = forward(self.input_ids[:, a:b], mask, self.positions[:, a:b], self.cache)
        self.mask, self.done = mask, b
        return logits if b == self.width else None

    def select(self, keep: list[int]) -> None:
        """Keep only these rows (the others were cancelled mid-prefill)."""
        import torch

        index = torch.tensor(keep, device=self.mask.device)
        self.size = len(keep)
        for name in ("input_ids", "new_mask", "positions", "mask"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)


def _cached_part(cached: Sequence[tuple[int, Any]], rows: int, device: Any) -> tuple[Any, Any]:
    """A DynamicCache holding each row's cached KV right-aligned in P columns, and its mask."""
    import torch
    from transformers import DynamicCache

    width = max(c for c, _ in cached)
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    if width == 0:
        return DynamicCache(), mask
    sample = next(kv for c, kv in cached if c)
    layers, _, heads, _, dim = sample.shape
    kv = sample.new_zeros((layers, 2, rows, heads, width, dim))
    for i, (c, row) in enumerate(cached):
        if c:
            kv[:, :, i, :, width - c:] = row
            mask[i, width - c:] = 1
    return DynamicCache(ddp_cache_data=[(kv[n, 0], kv[n, 1]) for n in range(layers)]), mask
