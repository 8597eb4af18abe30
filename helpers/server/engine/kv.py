"""KV-cache surgery on rows aligned by a 2-D attention mask (a prefill group's ``DynamicCache``).

Each row's tokens are the columns its mask marks, in order; padding (mask 0) may sit on the left
(rows of different lengths) or in the middle (a cached prefix, then new tokens: see prefill.py).
The decode batch keeps its KV in slots (kv_slots.py); these read rows out of either, and drop
a prefill group's rows that ended at their first token.
"""

from __future__ import annotations

from typing import Any


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


def kv_tensors(cache: Any) -> list[tuple[Any, Any]]:
    """Each layer's (keys, values) tensors as they are now."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def row_kv(kv: list[tuple[Any, Any]], mask_row: Any, row: int, start: int, end: int) -> Any:
    """KV ``[layers, 2, heads, end - start, dim]`` of tokens ``start:end`` of one batch row."""
    columns = mask_row.nonzero().squeeze(1)[start:end]
    first = kv[0][0]
    out = first.new_empty((len(kv), 2, first.shape[1], len(columns), first.shape[3]))
    contiguous = len(columns) > 0 and int(columns[-1] - columns[0]) + 1 == len(columns)
    for n, (keys, values) in enumerate(kv):
        for k, part in enumerate((keys[row], values[row])):
            if contiguous:  # the usual case: a slice, one copy
                out[n, k].copy_(part[:, int(columns[0]):int(columns[0]) + len(columns)])
            else:
                out[n, k].copy_(part.index_select(1, columns))
    return out


def kv_bytes_per_token(config: Any, dtype: Any) -> int:
    """Bytes of keys and values one token takes in every layer, e.g. 45 KiB for SmolLM2-135M."""
    import torch

    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * heads * head_dim * itemsize
