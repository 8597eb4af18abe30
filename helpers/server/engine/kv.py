"""KV-cache surgery on a batch whose rows are aligned by a 2-D attention mask.

Each row's tokens are the columns its mask marks, in order; padding (mask 0) may sit on the left
(rows of different lengths) or in the middle (a cached prefix, then new tokens: see prefill.py).
``DynamicCache`` keeps one rectangular tensor per layer, so rows joining or leaving are written
here: transformers offers ``batch_select_indices`` and ``crop`` but nothing that joins two
batches of different lengths.
"""

from __future__ import annotations

from typing import Any


def merge_rows(cache: Any, mask: Any, new_cache: Any, new_mask: Any) -> tuple[Any, Any]:
    """One batch from two: the shorter one is left-padded so both have one length."""
    import torch
    from transformers import DynamicCache

    width = max(mask.shape[1], new_mask.shape[1])

    def pad_left(t: Any) -> Any:
        dim = -2 if t.dim() == 4 else -1
        missing = width - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    layers = [(torch.cat([pad_left(old.keys), pad_left(new.keys)]),
               torch.cat([pad_left(old.values), pad_left(new.values)]))
              for old, new in zip(cache.layers, new_cache.layers, strict=True)]
    return DynamicCache(ddp_cache_data=layers), torch.cat([pad_left(mask), pad_left(new_mask)])


def keep_rows(cache: Any, mask: Any, keep: list[int]) -> Any:
    """Keep these rows (in place on ``cache``); return their mask, all-padding columns cut."""
    import torch

    index = torch.tensor(keep, device=mask.device)
    mask = mask.index_select(0, index)
    # Columns that are padding in every remaining row are dead weight: cut them.
    first = int(mask.any(0).long().argmax())
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, first:]
        layer.values = layer.values.index_select(0, index)[:, :, first:]
    return mask[:, first:]


def row_kv(cache: Any, mask_row: Any, row: int, start: int, end: int) -> Any:
    """KV ``[layers, 2, heads, end - start, dim]`` of tokens ``start:end`` of one batch row."""
    import torch

    columns = mask_row.nonzero().squeeze(1)[start:end]
    return torch.stack([torch.stack([layer.keys[row].index_select(1, columns),
                                     layer.values[row].index_select(1, columns)])
                        for layer in cache.layers])
