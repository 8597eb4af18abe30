"""The decode batch's KV in slots: a step, a join or a leave writes only the rows it concerns.

transformers' ``DynamicCache`` appends each step's keys and values with ``torch.cat``: every
step copies the whole batch's KV in every layer, and rows of another length can only join by
building a new rectangle. Here each layer holds one buffer ``[slots, kv heads, columns, head
dim]`` with room to grow, and the batch is its first ``rows`` slots between columns ``start`` and
``end``, every row right-aligned at ``end`` (a 2-D mask marks each row's own columns):

- a decode step writes one column in place (``SlotLayer.update``);
- a join writes its rows into the next free slots, right-aligned at ``end``;
- a leave moves the last rows into the freed slots, and dead columns only move ``start``;
- only when the buffer is full does it move to a larger one: one copy of the live part, with
  room for the rows' next tokens and, when rows ran out, twice the slots (as far as the row cap
  and the KV budget allow), so that moves are rare and memory stays near what the rows use.

transformers' own ``StaticCache`` gives every row the same length and position, and its paged
cache belongs to its own continuous-batching loop: neither takes rows that join mid-way with
prefixes of their own, hence this. It subclasses ``DynamicLayer`` and replaces only ``update``,
whose form is the same in transformers 4.56 and 5.x; the mask sizes and the sequence length
come from ``DynamicLayer`` itself, read off the views this class keeps in ``keys`` and ``values``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.cache_utils import DynamicLayer

MIN_ROOM = 32  # columns of headroom a new buffer gets at least (when the rows may use them)


@dataclass(frozen=True)
class SlotLimits:
    """How many slots a buffer may hold: the engine's row cap and its KV budget in tokens."""

    max_rows: int
    budget_tokens: int

    def slots(self, needed: int, wanted: int, columns: int) -> int:
        """``wanted`` slots as far as the row cap and the budget allow, never fewer than
        ``needed`` (rows already admitted are never refused here)."""
        return max(needed, min(wanted, self.max_rows, self.budget_tokens // max(1, columns)))


class SlotLayer(DynamicLayer):
    """One layer of ``SlotKV``: ``keys``/``values`` are views of the live slots and columns."""

    def __init__(self, slots: SlotKV, index: int) -> None:
        super().__init__()
        self._slots, self._index = slots, index
        self.is_initialized = True  # never lazily set up: its buffer exists

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any
               ) -> tuple[Any, Any]:
        """Write the new columns in place at ``end``; the keys and values to attend over."""
        return self._slots.write(self._index, key_states, value_states)


class SlotKV:
    """Every layer's keys and values of the decode batch, in preallocated slots."""

    def __init__(self, keys: list[Any], values: list[Any], start: int, limits: SlotLimits
                 ) -> None:
        from transformers import DynamicCache

        self.keys, self.values = keys, values  # per layer [slots, heads, columns, dim]
        self.limits = limits
        self.rows, self.start, self.end = 0, start, start
        self.cache = DynamicCache()
        self.cache.layers = [SlotLayer(self, n) for n in range(len(keys))]
        for layer, k in zip(self.cache.layers, keys, strict=True):
            layer.device, layer.dtype = k.device, k.dtype
        self._views()

    @classmethod
    def for_group(cls, cache: Any, width: int, future: int, limits: SlotLimits) -> SlotKV:
        """Empty slots for a first group of ``cache``'s rows, ``width`` columns wide."""
        columns = width + _room(width, 1, future)
        slots = cache.layers[0].keys.shape[0]  # more only when a join needs them
        keys = [_zeros(layer.keys, slots, columns) for layer in cache.layers]
        values = [_zeros(layer.values, slots, columns) for layer in cache.layers]
        return cls(keys, values, width, limits)

    @property
    def slots(self) -> int:
        """Rows the buffers hold room for."""
        return self.keys[0].shape[0]

    @property
    def columns(self) -> int:
        """Columns the buffers hold room for."""
        return self.keys[0].shape[2]

    @property
    def width(self) -> int:
        """Live columns (``end - start``): what attention runs over."""
        return self.end - self.start

    def held_tokens(self) -> int:
        """Token places the buffers hold (slots x columns), live or not: what the KV costs."""
        return self.slots * self.columns

    def write(self, index: int, keys: Any, values: Any) -> tuple[Any, Any]:
        """Layer ``index``: the new columns go in at ``end``; the live keys and values with them."""
        new, rows, end = keys.shape[2], self.rows, self.end
        self.keys[index][:rows, :, end:end + new].copy_(keys)
        self.values[index][:rows, :, end:end + new].copy_(values)
        layer = self.cache.layers[index]
        layer.keys = self.keys[index][:rows, :, self.start:end + new]
        layer.values = self.values[index][:rows, :, self.start:end + new]
        return layer.keys, layer.values

    def advance(self, columns: int = 1) -> None:
        """A forward pass wrote ``columns`` new columns into every layer."""
        self.end += columns
        self._views()

    def make_room(self, columns: int, future: int) -> None:
        """Room for ``columns`` more columns; new buffers (room for ``future`` more) if full."""
        if self.end + columns > self.columns:
            self._move(self.rows, self.width, columns, future)

    def join(self, cache: Any, mask: Any, batch_mask: Any, future: int) -> Any:
        """Write a prefilled group's rows into the next free slots; the batch's new mask.

        ``mask`` is the group's ``[rows, width]``, ``batch_mask`` the batch's own (None when
        empty). Nothing live changes if it fails: only free slots are written before the end.
        """
        import torch

        joining, width = mask.shape
        if self.rows + joining > self.slots or self.end < width:
            self._move(self.rows + joining, max(self.width, width), 1, future)
        end, rows = self.end, self.rows
        for n, layer in enumerate(cache.layers):
            self.keys[n][rows:rows + joining, :, end - width:end].copy_(layer.keys)
            self.values[n][rows:rows + joining, :, end - width:end].copy_(layer.values)
        start = min(self.start, end - width)
        new_mask = torch.zeros((rows + joining, end - start), dtype=mask.dtype, device=mask.device)
        if rows:
            new_mask[:rows, self.start - start:] = batch_mask
        new_mask[rows:, end - start - width:] = mask
        self.rows, self.start = rows + joining, start
        self._views()
        return new_mask

    def keep(self, indices: list[int], mask: Any) -> tuple[list[int], Any]:
        """Keep the rows at these indices, the others leave; their new order and mask.

        Kept rows past the new row count move into the freed slots below it: only those rows
        are copied. Columns left as padding in every row are cut by moving ``start`` only.
        """
        import torch

        kept = set(indices)
        count = len(kept)
        movers = iter(sorted(i for i in kept if i >= count))
        order = [i if i in kept else next(movers) for i in range(count)]
        for slot, old in enumerate(order):
            if slot != old:
                for buf in (*self.keys, *self.values):
                    buf[slot, :, self.start:self.end].copy_(buf[old, :, self.start:self.end])
        mask = mask.index_select(0, torch.tensor(order, device=mask.device))
        first = int(mask.any(0).long().argmax())
        self.rows, self.start = count, self.start + first
        self._views()
        return order, mask[:, first:]

    def _move(self, slots: int, width: int, columns: int, future: int) -> None:
        """Into new buffers of at least ``slots`` rows, ``width`` columns and room to grow: the
        live part is copied once, right-aligned at the new ``end`` so that narrower rows can
        join."""
        size = width + _room(width, columns, future)
        slots = self.limits.slots(slots, 2 * self.slots if slots > self.slots else self.slots,
                                  size)
        live, rows = self.width, self.rows
        keys = [_zeros(k, slots, size) for k in self.keys]
        values = [_zeros(v, slots, size) for v in self.values]
        for new, old in zip(keys + values, self.keys + self.values, strict=True):
            new[:rows, :, width - live:width].copy_(old[:rows, :, self.start:self.end])
        self.keys, self.values = keys, values
        self.start, self.end = width - live, width
        self._views()

    def _views(self) -> None:
        for n, layer in enumerate(self.cache.layers):
            layer.keys = self.keys[n][:self.rows, :, self.start:self.end]
            layer.values = self.values[n][:self.rows, :, self.start:self.end]


def _room(width: int, columns: int, future: int) -> int:
    """Columns past ``width``: those needed now, and up to a quarter more (at least
    ``MIN_ROOM``) while the rows may still grow into them, so that moves are rare."""
    return columns + min(max(0, future - columns), max(MIN_ROOM, width // 4))


def _zeros(like: Any, slots: int, columns: int) -> Any:
    """A zeroed buffer: masked columns meet zero weights in attention, and 0 x NaN is NaN."""
    return like.new_zeros((slots, like.shape[1], columns, like.shape[3]))
