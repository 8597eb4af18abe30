"""Batched token picking: one pass for the whole batch, each row by its own parameters and seed.

Interface (the engine owns the slot numbers: one slot per live row, ``0 <= slot < slots``)::

    sampler = BatchSampler(slots=8, vocab=logits_width, device=model.device)
    sampler.admit(slot, params, prompt_ids)  # a row starts: parameters, seed, prompt for the penalty
    tokens = sampler.pick(logits, slots)     # logits [rows, vocab]; row i belongs to slots[i]
    sampler.release(slot)                    # the row ended; admit may reuse the slot

``pick`` returns the tokens as a device tensor, records them for the repetition penalty and
advances each slot's step. It never waits for the device: every decision that depends on
parameters uses host-side copies taken at ``admit``, never tensor values.

One pick, in transformers' order (penalty, temperature, top-k, top-p):

- penalty: a presence tensor ``[slots, vocab]`` (prompt ids at admit, each chosen token at
  pick); seen scores are divided by the penalty when positive, multiplied when negative;
- greedy rows take the argmax; the others are scaled by their own temperature (floor 1e-4);
- rows with a filter share one ``topk`` (one full sort when a row has top-p without top-k),
  which gives each row a cutoff score; scores below it are dropped, so ties at the cutoff stay,
  as in transformers. Top-p keeps the most likely tokens until the mass before the next one
  reaches ``top_p``, and always the most likely one;
- every sampled row draws by inverse CDF over the whole vocabulary with one uniform number.

The uniforms come from a ``torch.Generator`` on the CPU, drawn once at admit for every token the
row may generate (``max_new_tokens``), seeded by the row's seed or, without one, by torch's
global RNG (``torch.manual_seed`` still repeats a run). Step ``s`` uses number ``s`` (a pick past
``max_new_tokens`` reuses the last one), so a seeded row picks the same tokens alone or in any
batch, given the same logits (tests/test_sampling.py checks it on the CPU). One number per row
and step is why it is inverse CDF and not Gumbel-max: Gumbel noise for 8 rows x 49152 tokens took
7-57 ms on this project's 2-core CPU (torch.rand or a hash, then two logs), exp + cumsum 4-5 ms.

Written by hand because transformers' logits processors apply one configuration to a whole
batch, while rows of a continuous batch each bring their own parameters and seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from helpers.chat import GenerationParams

MIN_TEMPERATURE = 1e-4  # below it sampling is greedy anyway; the floor avoids inf scores


class BatchSampler:
    """Per-slot sampling state on ``device`` for ``slots`` rows over ``vocab`` scores."""

    def __init__(self, slots: int, vocab: int, device: Any = "cpu") -> None:
        import torch

        if slots < 1 or vocab < 1:
            raise ValueError(f"slots and vocab must be >= 1; got {slots} and {vocab}")
        self.slots, self.vocab, self.device = slots, vocab, torch.device(device)
        self._params: list[GenerationParams | None] = [None] * slots
        self._seen = torch.zeros((slots, vocab), dtype=torch.bool, device=self.device)
        self._penalty = torch.ones(slots, device=self.device)
        self._temperature = torch.ones(slots, device=self.device)
        self._top_k = torch.full((slots,), vocab, dtype=torch.long, device=self.device)
        self._top_p = torch.full((slots,), float("inf"), dtype=torch.float64, device=self.device)
        self._step = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._uniform = torch.zeros((slots, 0), dtype=torch.float64, device=self.device)
        self._indices: dict[tuple[int, ...], Any] = {}

    def admit(self, slot: int, params: GenerationParams, prompt_ids: Sequence[int]) -> None:
        """Start a row in ``slot``: its parameters, its random numbers, its prompt as seen."""
        import torch

        self._check(slot)
        self._params[slot] = params
        self._seen[slot] = False
        if prompt_ids:
            self._seen[slot, _to(torch.tensor(list(prompt_ids)), self.device)] = True
        largest = torch.finfo(self._penalty.dtype).max  # 1e300 would not fit in float32
        self._penalty[slot] = min(params.repetition_penalty, largest)
        self._temperature[slot] = (1.0 if params.greedy
                                   else min(max(params.temperature, MIN_TEMPERATURE), largest))
        self._top_k[slot] = params.top_k if 0 < params.top_k < self.vocab else self.vocab
        self._top_p[slot] = params.top_p if params.top_p < 1.0 else float("inf")
        self._step[slot] = 0
        if params.greedy:
            return
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed % 2**64)
        uniform = torch.rand(params.max_new_tokens, dtype=torch.float64, generator=generator)
        if uniform.shape[0] > self._uniform.shape[1]:  # grows at admit, never inside a step
            wider = self._uniform.new_zeros((self.slots, max(uniform.shape[0],
                                                              2 * self._uniform.shape[1])))
            wider[:, :self._uniform.shape[1]] = self._uniform
            self._uniform = wider
        self._uniform[slot, :uniform.shape[0]] = _to(uniform, self.device)

    def release(self, slot: int) -> None:
        """The row in ``slot`` ended; its state is reset at the next admit."""
        self._check(slot)
        self._params[slot] = None

    def pick(self, logits: Any, slots: Sequence[int]) -> Any:
        """The next token of every row (a 1-D long tensor); recorded for the penalty."""
        import torch

        x, index, params = self._penalised(logits, slots)
        tokens = torch.empty(len(slots), dtype=torch.long, device=x.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:
            rows = self._rows(greedy, len(slots))
            tokens[rows] = x[rows].argmax(-1)
        if sampled:
            rows = self._rows(sampled, len(slots))
            y, cutoff = self._filtered(x[rows], index[rows], [params[i] for i in sampled])
            tokens[rows] = self._draw(y, cutoff, index[rows])
        self._seen[index, tokens] = True
        self._step[index] += 1
        return tokens

    def scores(self, logits: Any, slots: Sequence[int]) -> Any:
        """What each row picks from: sampled rows' scaled scores, -inf where filtered out.

        Greedy rows give their penalised scores. Nothing is recorded: for tests and inspection.
        """

        x, index, params = self._penalised(logits, slots)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = self._rows(sampled, len(slots))
            y, cutoff = self._filtered(x[rows], index[rows], [params[i] for i in sampled])
            x[rows] = y if cutoff is None else y.masked_fill(y < cutoff, float("-inf"))
        return x

    # One pass, in steps.

    def _penalised(self, logits: Any, slots: Sequence[int]) -> tuple[Any, Any, list[Any]]:
        """The scores after the repetition penalty, the slots as a tensor, the rows' params."""
        import torch

        if logits.dim() != 2 or logits.shape != (len(slots), self.vocab):
            raise ValueError(f"logits must be [{len(slots)}, {self.vocab}] (rows, vocab); "
                             f"got {list(logits.shape)}")
        if len(set(slots)) != len(slots):
            raise ValueError(f"each row needs its own slot; got {list(slots)}")
        for slot in slots:
            self._check(slot)
        params = [self._params[s] for s in slots]
        if any(p is None for p in params):
            raise ValueError(f"a slot of {list(slots)} has no row (admit it first)")
        index = self._index(tuple(slots))
        x = logits.float()
        if any(p.repetition_penalty != 1.0 for p in params):
            penalty = self._penalty[index].unsqueeze(1)
            changed = torch.where(x < 0, x * penalty, x / penalty)  # as transformers does
            x = torch.where(self._seen[index], changed, x)
        # Extreme parameters (a penalty of 1e-300, say) overflow to inf/nan: keep scores usable.
        return _finite(x), index, params

    def _filtered(self, x: Any, index: Any, params: list[Any]) -> tuple[Any, Any | None]:
        """Scores scaled by temperature, and each row's cutoff (None: no row has a filter)."""
        import torch

        y = _finite(x / self._temperature[index].unsqueeze(1))
        rows = [i for i, p in enumerate(params) if _filters(p, self.vocab)]
        if not rows:
            return y, None
        cutoff = torch.full((len(params), 1), float("-inf"), device=y.device)
        chosen = self._rows(rows, len(params))
        cutoff[chosen] = self._cutoff(y[chosen], index[chosen], [params[i] for i in rows])
        return y, cutoff

    def _cutoff(self, y: Any, index: Any, params: list[Any]) -> Any:
        """The lowest score each row keeps after top-k then top-p: one topk (or sort) for all."""
        import torch

        full = any(not 0 < p.top_k < self.vocab for p in params)  # top-p alone needs every score
        width = self.vocab if full else max(p.top_k for p in params)
        values = y.sort(-1, descending=True).values if full else y.topk(width).values
        k = self._top_k[index].clamp(max=width).unsqueeze(1)
        inside = torch.arange(width, device=y.device) < k
        # Top-p over the top-k, as transformers' TopPLogitsWarper after TopKLogitsWarper; the
        # cumulative sums are sequential per row, so a row gets the same cutoff in any batch.
        weights = torch.nan_to_num((values - values[:, :1]).exp(), nan=0.0).masked_fill(~inside, 0)
        mass = weights.cumsum(-1, dtype=torch.float64)
        keep = (mass - weights) < self._top_p[index].unsqueeze(1) * mass[:, -1:]
        keep[:, 0] = True  # the most likely token stays, even for a top_p that rounds to 0
        kept = (keep & inside).sum(-1, keepdim=True)
        return values.gather(1, kept - 1)

    def _draw(self, y: Any, cutoff: Any | None, index: Any) -> Any:
        """One token per row by inverse CDF over the scores at or above its cutoff."""
        import torch

        top = y.amax(-1, keepdim=True).clamp(min=torch.finfo(y.dtype).min)  # all -inf: no nan
        weights = (y - top).exp()
        if cutoff is not None:
            weights.masked_fill_(y < cutoff, 0)
        mass = weights.cumsum(-1, dtype=torch.float64)
        step = self._step[index].clamp(max=max(0, self._uniform.shape[1] - 1))
        target = self._uniform[index, step].unsqueeze(1) * mass[:, -1:]
        drawn = torch.searchsorted(mass, target, right=True)
        return drawn.clamp(max=self.vocab - 1).squeeze(1)

    def _rows(self, rows: list[int], count: int) -> Any:
        """Row positions as an index (a slice when they are all rows, which copies nothing)."""
        return slice(None) if len(rows) == count else self._index(tuple(rows))

    def _index(self, values: tuple[int, ...]) -> Any:
        """``values`` as a long tensor on the device, kept: batches repeat between joins."""
        import torch

        index = self._indices.get(values)
        if index is None:
            if len(self._indices) >= 256:
                self._indices.clear()
            index = self._indices[values] = _to(torch.tensor(values, dtype=torch.long),
                                                self.device)
        return index

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot must be in [0, {self.slots}); got {slot}")


def _filters(params: GenerationParams, vocab: int) -> bool:
    """True when top-k or top-p can drop a token of this row."""
    return 0 < params.top_k < vocab or params.top_p < 1.0


def _to(tensor: Any, device: Any) -> Any:
    """A host tensor copied to ``device`` without waiting for the kernels queued there."""
    return tensor.to(device, non_blocking=True)


def _finite(x: Any) -> Any:
    """nan -> -inf, +inf -> the largest float: every score comparable, none poisoning a sum."""
    import torch

    return torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max)
