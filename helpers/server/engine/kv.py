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
    from transformers import DynamicCache

    width = max(mask.shape[1], new_mask.shape[1])
    layers = [(_stack_right(old.keys, new.keys, width), _stack_right(old.values, new.values, width))
              for old, new in zip(cache.layers, new_cache.layers, strict=True)]
    return DynamicCache(ddp_cache_data=layers), _stack_right(mask, new_mask, width)


def _stack_right(a: Any, b: Any, width: int) -> Any:
    """``a`` over ``b`` (rows), each right-aligned in ``width`` columns, zeros on the left.

    One allocation and one copy of each part: joining a long prompt's KV onto running rows
    moves hundreds of MB, and pad-then-cat would move it twice.
    """
    dim = 2 if a.dim() == 4 else 1  # KV [rows, heads, columns, dim] or a mask [rows, columns]
    shape = list(a.shape)
    shape[0], shape[dim] = a.shape[0] + b.shape[0], width
    out = a.new_empty(shape)
    for part, rows in ((a, slice(0, a.shape[0])), (b, slice(a.shape[0], shape[0]))):
        pad = width - part.shape[dim]
        target = out[rows]
        target.narrow(dim, 0, pad).zero_()
        target.narrow(dim, pad, part.shape[dim]).copy_(part)
    return out


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
