"""How newcomers get into the running batch: prefix lookup, chunked prefill, join, block storing.

A mixin of ``BatchingEngine`` (its worker thread calls these stages): kept apart so each file
stays readable. The state it uses is created by ``BatchingEngine.__init__``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from helpers.chat import GenerationParams, TokenBatchable
from helpers.server.engine.base import EngineStats, Finish, Stream
from helpers.server.engine.kv import keep_rows, kv_tensors, merge_rows, row_kv
from helpers.server.engine.prefill import PrefillGroup
from helpers.server.engine.prefix_cache import PrefixCache
from helpers.server.engine.rows import Row

Pending = tuple[Stream, list[int], GenerationParams]


class Admission:
    """Prefill stages of the batching engine."""

    batchable: TokenBatchable
    model: Any
    stats: EngineStats
    eos: set[int]
    pad_id: int
    chunk_tokens: int
    prefix_cache: PrefixCache | None
    _lock: Any
    _rows: list[Row]
    _cache: Any
    _mask: Any
    _group: PrefillGroup | None
    _group_rows: list[Row]
    _ready: tuple[list[Row], Any, Any] | None
    _to_store: list[tuple[Row, list[tuple[Any, Any]], Any, int, int]]
    _count: Callable[..., None]
    _fail: Callable[[list[Row], BaseException], None]
    _finish: Callable[[Row], None]
    _forward: Callable[[Any, Any, Any, Any], Any]
    _pick: Callable[[list[Row], Any], None]
    _take_ready: Callable[[], tuple[list[Row], Any, Any]]

    def _start_group(self, joining: list[Pending]) -> None:
        """Turn live newcomers into rows, look up their cached prefixes, open a prefill group."""
        rows = []
        for stream, ids, params in joining:
            if stream.cancelled.is_set():  # gone while waiting: spend no prefill on it
                self._count("cancelled")
                stream.close(Finish("cancelled", len(ids)))
            else:
                rows.append(Row.new(stream, ids, params, self.batchable, self.model.device))
        if not rows:
            return
        try:
            cached = [self._lookup(r) for r in rows]
            self._group = PrefillGroup([r.prompt_ids for r in rows], cached, self.pad_id,
                                       self.model.device)
            self._group_rows = rows
        except Exception as exc:  # fail the newcomers only
            self._fail(rows, exc)

    def _lookup(self, row: Row) -> tuple[int, Any]:
        if self.prefix_cache is None:
            return 0, None
        row.cached, kv = self.prefix_cache.lookup(row.prompt_ids)
        if row.cached:
            with self._lock:
                self.stats.cache_hits += 1
                self.stats.cached_tokens += row.cached
        return row.cached, kv

    def _prefill_chunk(self) -> None:
        """One chunk of the group's prefill; when it is the last, the group joins the batch."""
        group, rows = self._group, self._group_rows
        assert group is not None
        keep = [i for i, r in enumerate(rows) if not r.stream.cancelled.is_set()]
        if len(keep) < len(rows):  # cancelled mid-prefill: their partial KV is never stored
            for r in (r for i, r in enumerate(rows) if i not in keep):
                r.finish_reason = "cancelled"
                self._finish(r)
            if not keep:
                self._group, self._group_rows = None, []
                return
            group.select(keep)
            rows = self._group_rows = [rows[i] for i in keep]
        # Chunks only protect running streams: with none, the whole prompt goes in one pass.
        budget = self.chunk_tokens if self._rows else group.rows * group.width
        logits = group.step(self._forward, budget)
        with self._lock:
            self.stats.prefill_chunks += 1
        if logits is None:
            return
        self._pick(rows, logits)
        for r in rows:
            r.emit(self.eos)  # the first token goes out now; joining the batch comes next
        # Cleared only now: if picking failed, _guarded fails these rows instead of losing them.
        self._group, self._group_rows = None, []
        with self._lock:
            self.stats.prefills += 1
            self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in rows)
        self._ready = (rows, group.cache, group.mask)

    def _join_ready(self) -> None:
        """Store the prefilled prompts' blocks; rows that go on join the running batch."""
        rows, cache, mask = self._take_ready()
        if self.prefix_cache is not None:  # stored next iteration, from the group's own KV
            kv = kv_tensors(cache)  # tensors are never changed in place: a stable snapshot
            self._to_store = [(r, kv, mask[i], i, len(r.prompt_ids)) for i, r in enumerate(rows)]
        keep = [i for i, r in enumerate(rows) if r.finish_reason is None]
        for r in rows:
            if r.finish_reason is not None:  # one token was all it needed (or it ended at once)
                self._finish(r)
        if len(keep) < len(rows) and keep:
            mask = keep_rows(cache, mask, keep)
        if keep:
            self._merge([rows[i] for i in keep], cache, mask)

    def _store_prompts(self) -> None:
        """Keep the blocks of the prompts that joined last iteration."""
        to_store, self._to_store = self._to_store, []
        for item in to_store:
            self._remember(*item)

    def _remember(self, r: Row, kv: list[tuple[Any, Any]], mask_row: Any, index: int,
                  length: int) -> None:
        """Store the full blocks of this row's first ``length`` tokens (KV already computed)."""
        if self.prefix_cache is None:
            return
        ids = (r.prompt_ids + r.tokens)[:length]
        self.prefix_cache.store(ids, lambda a, b: row_kv(kv, mask_row, index, a, b))
        with self._lock:
            self.stats.cache_bytes = self.prefix_cache.bytes
            self.stats.cache_blocks = len(self.prefix_cache)
            self.stats.cache_evictions = self.prefix_cache.evictions

    def _merge(self, rows: list[Row], cache: Any, mask: Any) -> None:
        """Append new rows to the running batch."""
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        self._cache, self._mask = merge_rows(self._cache, self._mask, cache, mask)
        self._rows = self._rows + rows
