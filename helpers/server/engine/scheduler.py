"""The scheduler: who waits, who is admitted, and what each step of the worker runs.

As in vLLM's v1 scheduler, it only decides; it returns a ``StepPlan`` and the engine carries it
out (``KVManager`` for the cache, ``ModelRunner`` for the model). Memory decides how many rows
run: every row may grow to its prompt plus its ``max_new_tokens`` (``reserved_tokens``), and the
slots hold every row as wide as the widest one (rows are right-aligned, see kv_slots.py), so
newcomers are admitted while rows x the widest reservation fit the KV budget
(``Settings.kv_cache_mb``; the slots themselves are sized within it, and a move to larger ones
briefly holds the old beside the new), up to a hard cap of rows (``Settings.max_batch_size``).
A request that does not fit now waits without blocking smaller ones behind it, until it has been
passed over ``PATIENCE`` times.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from helpers.chat import GenerationParams
from helpers.server.engine.base import QueueFullError, Stream

Stage = Literal["join", "store", "prefill"]

# How often a request (or a prefill group) may see later, smaller ones go first; then it goes next.
PATIENCE = 8


def reserved_tokens(prompt_ids: list[int], params: GenerationParams) -> int:
    """The most tokens a request's KV can hold: its prompt and every token it may generate."""
    return len(prompt_ids) + params.max_new_tokens


@dataclass
class Request:
    """A submitted request that waits for a place in the batch."""

    stream: Stream
    prompt_ids: list[int]
    params: GenerationParams
    passed_over: int = 0  # plans that admitted a later request while this one did not fit

    @property
    def kv_tokens(self) -> int:
        """The most tokens its KV can hold (``reserved_tokens``)."""
        return reserved_tokens(self.prompt_ids, self.params)


@dataclass(frozen=True)
class BatchLoad:
    """What the KV manager holds now: the scheduler's view of the batch."""

    running: int = 0  # rows in the decode batch
    prefilled: int = 0  # rows prefilled, waiting to join the batch
    widest: int = 0  # the largest reservation among rows admitted and not yet finished
    prefill_rows: int = 0  # rows of the prefill group under way (0: none)
    storing: bool = False  # prompt blocks wait to go into the prefix cache


@dataclass
class StepPlan:
    """What one step of the worker runs, in this order."""

    admit: list[Request] = field(default_factory=list)  # newcomers: they open a prefill group
    decode: bool = False  # every running row takes one token
    stage: Stage | None = None  # then one more stage: join the prefilled, store blocks, prefill
    prefill_tokens: int | None = None  # the token budget of this step's prefill chunk (None: all)


class Scheduler:
    """A bounded FIFO of requests, admitted while their KV fits, and one plan per step."""

    def __init__(self, max_rows: int, kv_budget_tokens: int, chunk_tokens: int,
                 max_queue: int) -> None:
        self.max_rows = max(1, max_rows)
        self.kv_budget_tokens = kv_budget_tokens
        self.chunk_tokens = max(1, chunk_tokens)
        self.max_queue = max_queue
        self.waiting: deque[Request] = deque()

    def add(self, request: Request) -> None:
        """Queue one request; raise ``QueueFullError`` when ``max_queue`` already wait."""
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(
                f"{len(self.waiting)} requests are waiting for the model; try again soon",
                retry_after=1.0,
            )
        self.waiting.append(request)

    def drain(self) -> list[Request]:
        """Every waiting request, taken off the queue (the engine is stopping)."""
        requests, self.waiting = list(self.waiting), deque()
        return requests

    def plan(self, load: BatchLoad) -> StepPlan:
        """The next step: admit (a new prefill group beside any under way), decode, one stage."""
        admit = self._admit(load)
        prefill_rows = load.prefill_rows + len(admit)
        if load.prefilled:
            stage: Stage | None = "join"
        elif load.storing:
            stage = "store"
        elif prefill_rows:
            stage = "prefill"
        else:
            stage = None
        return StepPlan(admit=admit, decode=load.running > 0, stage=stage,
                        prefill_tokens=self._prefill_budget(prefill_rows, load.running))

    def fits_alone(self, request: Request) -> bool:
        """False when the request's KV alone is over the budget: it could never run."""
        return request.kv_tokens <= self.kv_budget_tokens

    def _admit(self, load: BatchLoad) -> list[Request]:
        """Waiting requests, oldest first, that fit beside the batch (rows x widest <= budget)."""
        rows, widest = load.running + load.prefilled + load.prefill_rows, load.widest
        admitted: list[Request] = []
        passed: list[Request] = []
        for req in self.waiting:
            if rows >= self.max_rows:
                break
            wider = max(widest, req.kv_tokens)
            if rows and (rows + 1) * wider > self.kv_budget_tokens:
                passed.append(req)
                if req.passed_over >= PATIENCE:  # it has waited long enough: nobody else first
                    break
                continue
            admitted.append(req)
            rows, widest = rows + 1, wider
        if admitted:
            taken = {id(r) for r in admitted}
            self.waiting = deque(r for r in self.waiting if id(r) not in taken)
            for req in passed:
                req.passed_over += 1
        return admitted

    def _prefill_budget(self, prefill_rows: int, running: int) -> int | None:
        """Tokens for one prefill chunk: whole prompts when nothing runs, else chunks.

        A chunk pauses the running streams so that the new ones start sooner. One long prompt
        against three running streams gets ``chunk_tokens``; a classroom of 29 newcomers
        against one running stream gets 29 times that: the pause is weighed against the
        number of streams that wait for their first token.
        """
        if not running or not prefill_rows:
            return None  # nobody waits for a decode step: the whole prompts in one pass
        return self.chunk_tokens * max(1, math.ceil(prefill_rows / running))
