"""The KV manager: the running batch's cache and mask, the prefill group, the prefix cache.

State lives on named types: the decode batch (``RunningBatch``), the groups being prefilled
(``Prefilling``: several at once, newcomers need not wait for an earlier group), prefilled
groups waiting to join (``Prefilled``) and prompt blocks waiting to go into the prefix cache
(``BlocksToStore``). Each ``take_*`` method removes one of them
and returns its rows: the engine fails exactly those when the stage that holds them fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from helpers.server.engine.kv import keep_rows, kv_tensors, row_kv
from helpers.server.engine.kv_slots import SlotKV, SlotLimits
from helpers.server.engine.prefill import PrefillGroup
from helpers.server.engine.prefix_cache import PrefixCache
from helpers.server.engine.rows import Row
from helpers.server.engine.scheduler import BatchLoad, reserved_tokens

log = logging.getLogger(__name__)


@dataclass
class RunningBatch:
    """The rows that decode together: their KV in slots and the 2-D mask that aligns them."""

    rows: list[Row] = field(default_factory=list)
    kv: SlotKV | None = None
    mask: Any = None  # [rows, live columns]

    @property
    def cache(self) -> Any:
        """The transformers cache the model reads and writes (the slots' layers)."""
        return self.kv.cache if self.kv is not None else None

    def future(self) -> int:
        """The most tokens any row may still take: how far its KV may grow."""
        return max((r.params.max_new_tokens - len(r.tokens) for r in self.rows), default=0)

    def decode_inputs(self, device: Any) -> tuple[Any, Any, Any]:
        """A decode step's input ids, position ids and mask (one new column per row, for which
        the slots make room)."""
        import torch

        self.kv.make_room(1, self.future())
        input_ids = torch.tensor([[r.next_token] for r in self.rows], device=device)
        positions = torch.tensor([[r.position] for r in self.rows], device=device)
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        return input_ids, positions, mask


@dataclass
class Prefilling:
    """Newcomers being prefilled together, chunk by chunk."""

    rows: list[Row]
    group: PrefillGroup
    waited: int = 0  # steps in a row that this group's prefill did not advance


@dataclass
class Prefilled:
    """A group whose prompts are done (first token picked): it joins the batch next."""

    rows: list[Row]
    cache: Any
    mask: Any


@dataclass
class BlocksToStore:
    """The first ``length`` tokens of one row, whose KV sits in row ``index`` of ``kv``."""

    row: Row
    # Each layer's (keys, values). A prefill group's are never changed in place; the decode
    # batch's slots are, so its rows' blocks are stored at once (update_from_output).
    kv: list[tuple[Any, Any]]
    mask_row: Any
    index: int
    length: int


class KVManager:
    """Owns every KV tensor of the engine; the worker thread is its only caller."""

    def __init__(self, prefix_cache: PrefixCache | None, count: Callable[[str, int], None],
                 limits: SlotLimits) -> None:
        self.prefix_cache = prefix_cache
        self.limits = limits  # how many slots the decode batch's buffers may hold
        self._count = count  # the engine's counters
        self.running = RunningBatch()
        self.prefilling: list[Prefilling] = []  # oldest first
        self.prefilled: list[Prefilled] = []
        self.to_store: list[BlocksToStore] = []

    def busy(self) -> bool:
        """True while any row or block needs the worker."""
        return bool(self.running.rows or self.prefilling or self.prefilled or self.to_store)

    def load(self) -> BatchLoad:
        """The scheduler's view: rows, the widest reservation, stages pending."""
        prefilled = [r for p in self.prefilled for r in p.rows]
        prefilling = [r for p in self.prefilling for r in p.rows]
        held = [*self.running.rows, *prefilled, *prefilling]
        return BatchLoad(running=len(self.running.rows), prefilled=len(prefilled),
                         widest=max((reserved_tokens(r.prompt_ids, r.params) for r in held),
                                    default=0),
                         prefill_rows=len(prefilling),
                         storing=bool(self.to_store))

    def slot_tokens(self) -> int:
        """Token places the decode batch's slots hold now, live or free."""
        return self.running.kv.held_tokens() if self.running.kv is not None else 0

    def rows_prefilling(self) -> int:
        """Rows admitted whose prompts are not in the decode batch yet."""
        return sum(len(p.rows) for p in [*self.prefilling, *self.prefilled])

    # Taking state out: on failure, on shut-down, or to run a stage on it.

    def take_running(self) -> list[Row]:
        """Empty the decode batch; its rows."""
        rows, self.running = self.running.rows, RunningBatch()
        return rows

    def take_prefilling(self) -> list[Row]:
        """Drop every prefill group; their rows."""
        groups, self.prefilling = self.prefilling, []
        return [r for p in groups for r in p.rows]

    def take_group(self, group: Prefilling) -> list[Row]:
        """Drop one prefill group (its chunk failed); its rows."""
        self.prefilling = [p for p in self.prefilling if p is not group]
        return group.rows

    def take_prefilled(self) -> list[Prefilled]:
        """The prefilled groups, no longer held here."""
        prefilled, self.prefilled = self.prefilled, []
        return prefilled

    # Admission and prefill.

    def open_group(self, rows: list[Row], pad_id: int, device: Any) -> None:
        """Look up each row's cached prefix and start their prefill group."""
        cached = [self._lookup(r) for r in rows]
        group = PrefillGroup([r.prompt_ids for r in rows], cached, pad_id, device)
        self.prefilling.append(Prefilling(rows, group))

    def _lookup(self, row: Row) -> tuple[int, Any]:
        if self.prefix_cache is None:
            return 0, None
        row.cached, kv = self.prefix_cache.lookup(row.prompt_ids)
        if row.cached:
            self._count("cache_hits", 1)
            self._count("cached_tokens", row.cached)
        return row.cached, kv

    def drop_cancelled(self) -> list[Row]:
        """Rows of the prefill groups whose clients left, taken out (their KV is never kept)."""
        gone: list[Row] = []
        for prefilling in list(self.prefilling):
            keep = [i for i, r in enumerate(prefilling.rows) if not r.stream.cancelled.is_set()]
            gone += [r for i, r in enumerate(prefilling.rows) if i not in keep]
            if not keep:
                self.take_group(prefilling)
            elif len(keep) < len(prefilling.rows):
                prefilling.group.select(keep)
                prefilling.rows = [prefilling.rows[i] for i in keep]
        return gone

    def finish_prefill(self, prefilling: Prefilling) -> None:
        """The group's prompts are done: it waits to join the batch."""
        self.take_group(prefilling)
        group = prefilling.group
        self.prefilled.append(Prefilled(prefilling.rows, group.cache, group.mask))

    # Joining and leaving the decode batch.

    def join(self, prefilled: Prefilled) -> None:
        """Rows still going join the decode batch; then every prompt's blocks wait to be stored."""
        rows, cache, mask = prefilled.rows, prefilled.cache, prefilled.mask
        # A snapshot first: keep_rows swaps the layers' tensors, it never changes them in place.
        blocks = ([BlocksToStore(r, kv_tensors(cache), mask[i], i, len(r.prompt_ids))
                   for i, r in enumerate(rows)] if self.prefix_cache is not None else [])
        keep = [i for i, r in enumerate(rows) if r.finish_reason is None]
        if keep and len(keep) < len(rows):
            mask = keep_rows(cache, mask, keep)
        joining = [rows[i] for i in keep]
        if joining:  # only free slots are written: if it fails, the running rows are untouched
            batch = RunningBatch(self.running.rows + joining)
            future = batch.future()
            kv = self.running.kv or SlotKV.for_group(cache, mask.shape[1], future, self.limits)
            batch.kv, batch.mask = kv, kv.join(cache, mask, self.running.mask, future)
            self.running = batch
        self.to_store += blocks

    def advance(self, mask: Any) -> None:
        """A decode step ran: every row's KV holds one more token, covered by ``mask``."""
        self.running.mask = mask
        self.running.kv.advance(1)
        for r in self.running.rows:
            r.position += 1

    def update_from_output(self) -> list[Row]:
        """After a step (vLLM's ``Scheduler.update_from_output``): rows that ended leave the
        batch, their prompt and reply first stored as prefix blocks (failed rows' are not);
        those rows, for the engine to close."""
        rows = self.running.rows
        ended = [i for i, r in enumerate(rows) if r.finish_reason is not None]
        if not ended:
            return []
        for i in ended:
            if rows[i].finish_reason != "error":
                self.store(self.finished_blocks(i))
        self.retain([i for i in range(len(rows)) if i not in ended])
        return [rows[i] for i in ended]

    def retain(self, indices: list[int]) -> None:
        """Keep only the rows at these indices of the decode batch; the others leave."""
        batch = self.running
        if not indices:
            self.running = RunningBatch()
            return
        order, mask = batch.kv.keep(indices, batch.mask)
        self.running = RunningBatch([batch.rows[i] for i in order], batch.kv, mask)

    # The prefix cache.

    def take_blocks(self) -> list[BlocksToStore]:
        """The prompt blocks waiting to be stored, no longer held here."""
        blocks, self.to_store = self.to_store, []
        return blocks

    def finished_blocks(self, index: int) -> BlocksToStore:
        """Row ``index`` of the decode batch, prompt and reply, as blocks to store."""
        r = self.running.rows[index]
        return BlocksToStore(r, kv_tensors(self.running.cache), self.running.mask[index], index,
                             r.position)

    def store(self, blocks: BlocksToStore) -> None:
        """Keep the full blocks of one row's first ``length`` tokens (KV already computed).

        A failure costs only those blocks, never a stream: the prefix cache is an optimisation.
        """
        if self.prefix_cache is None:
            return
        r = blocks.row
        ids = (r.prompt_ids + r.tokens)[:blocks.length]
        try:
            self.prefix_cache.store(ids, lambda a, b: row_kv(blocks.kv, blocks.mask_row,
                                                             blocks.index, a, b))
        except Exception:
            log.exception("storing blocks in the prefix cache failed; the replies go on")
            self._count("store_errors", 1)
