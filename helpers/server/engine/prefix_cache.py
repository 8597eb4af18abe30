"""Prefix (KV) reuse: keys/values of earlier prompts, in blocks of tokens, bounded, LRU-evicted.

A block holds the KV of ``block_tokens`` consecutive tokens. Its key is a hash chained over every
token before it (as vLLM's automatic prefix caching), so a block is found only when the whole
prefix up to its end matches: the KV of a token depends on every token before it and on its
absolute position, and both are then the same.

Written by hand because transformers' block sharing (``generation/continuous_batching``) lives
inside its paged-attention cache, which measured ~2x slower than our DynamicCache loop on CPU
(see helpers/bench); ``DynamicCache`` itself has no notion of sharing. Blocks are stored as one
tensor ``[layers, 2 (keys, values), kv_heads, block_tokens, head_dim]`` on the model's device, so
rebuilding a row's KV is one ``torch.cat`` and a block's bytes are its ``nbytes``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BLOCK_TOKENS = 16  # small enough that a new turn reuses all but < 16 tokens of the last one


@dataclass
class _Block:
    kv: Any  # [layers, 2, kv_heads, block_tokens, head_dim]
    nbytes: int


class PrefixCache:
    """Blocks of KV keyed by chained token hashes; least recently used blocks go first."""

    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.budget_bytes = budget_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def keys_for(self, ids: Sequence[int], n_blocks: int) -> list[bytes]:
        """The chained keys of the first ``n_blocks`` full blocks of ``ids``."""
        keys, parent, size = [], b"", self.block_tokens
        for b in range(n_blocks):
            digest = hashlib.sha256(parent)
            digest.update(array("q", ids[b * size:(b + 1) * size]).tobytes())
            parent = digest.digest()
            keys.append(parent)
        return keys

    def lookup(self, ids: Sequence[int]) -> tuple[int, Any]:
        """(cached tokens, KV ``[layers, 2, heads, tokens, dim]`` or None) of the longest prefix.

        At least one token of ``ids`` is always left out: its forward pass gives the logits of
        the first new token.
        """
        found = []
        for key in self.keys_for(ids, (len(ids) - 1) // self.block_tokens):
            block = self._blocks.get(key)
            if block is None:
                break
            found.append((key, block))
        if not found:
            return 0, None
        self._touch([key for key, _ in found])
        kv = found[0][1].kv if len(found) == 1 else _cat([b.kv for _, b in found])
        return len(found) * self.block_tokens, kv

    def store(self, ids: Sequence[int], row_kv: Any) -> int:
        """Keep the full blocks of ``ids`` whose KV ``row_kv(start, end)`` returns; new blocks count.

        ``row_kv`` is called once, for the span of the blocks not yet held, and returns
        ``[layers, 2, heads, end - start, dim]``; nothing is copied when every block is held.
        """
        keys = self.keys_for(ids, len(ids) // self.block_tokens)
        missing = [b for b, key in enumerate(keys) if key not in self._blocks]
        self._touch([key for key in keys if key in self._blocks])
        if not missing or self.budget_bytes <= 0:
            return 0
        size, first = self.block_tokens, missing[0]
        span = row_kv(first * size, len(keys) * size)
        added, chain = 0, set(keys)
        for b in missing:
            kv = span[:, :, :, (b - first) * size:(b - first + 1) * size].clone()
            nbytes = kv.numel() * kv.element_size()
            # Never evict this chain's own blocks to make room for its later ones: a chain
            # cut at the root is never found again, while its head alone still saves work.
            if not self._evict_for(nbytes, chain):
                break
            self._blocks[keys[b]] = _Block(kv, nbytes)
            self.bytes += nbytes
            added += 1
        self._touch(keys)
        return added

    def clear(self) -> None:
        """Drop every block."""
        self._blocks.clear()
        self.bytes = 0

    def _touch(self, keys: list[bytes]) -> None:
        # Deepest block first, the root last: the LRU end then holds leaves, so eviction trims
        # a chain from its tail and never orphans the blocks after an evicted one.
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _evict_for(self, nbytes: int, keep: set[bytes]) -> bool:
        """Evict least recently used blocks, none in ``keep``, until ``nbytes`` fit; False if not."""
        while self.bytes + nbytes > self.budget_bytes:
            oldest = next(iter(self._blocks), None)
            if oldest is None or oldest in keep:  # ``keep`` was touched last: it sits at the end
                return False
            self.bytes -= self._blocks.pop(oldest).nbytes
            self.evictions += 1
        return True


def reusable(config: Any) -> bool:
    """True when every layer attends to the whole past: then cached KV blocks are reusable.

    Sliding-window layers keep only their window, so their KV cannot be cut into blocks here.
    """
    types = getattr(config, "layer_types", None)
    if types:
        return all(t == "full_attention" for t in types)
    return not (getattr(config, "use_sliding_window", False)
                and getattr(config, "sliding_window", None))


def _cat(parts: list[Any]) -> Any:
    import torch

    return torch.cat(parts, dim=3)
