"""The scheduler: who waits, who is admitted, and what each step of the worker runs.

As in vLLM's v1 scheduler, it only decides; it returns a ``StepPlan`` and the engine carries it
out (``KVManager`` for the cache, ``ModelRunner`` for the model). Memory decides how many rows
run: every row reserves the KV of its prompt plus its ``max_new_tokens``, and newcomers are
admitted while the reservations fit the KV budget (``Settings.kv_cache_mb``), up to a hard cap
of rows (``Settings.max_batch_size``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from helpers.chat import GenerationParams
from helpers.server.engine.base import QueueFullError, Stream

Stage = Literal["join", "store", "prefill"]


@dataclass
class Request:
    """A submitted request that waits for a place in the batch."""

    stream: Stream
    prompt_ids: list[int]
    params: GenerationParams

    @property
    def kv_tokens(self) -> int:
        """The most tokens its KV can hold: the prompt and every token it may generate."""
        return len(self.prompt_ids) + self.params.max_new_tokens


@dataclass(frozen=True)
class BatchLoad:
    """What the KV manager holds now: the scheduler's view of the batch."""

    running: int = 0  # rows in the decode batch
    prefilled: int = 0  # rows prefilled, waiting to join the batch
    kv_tokens: int = 0  # KV tokens reserved by every row admitted and not yet finished
    prefill_rows: int = 0  # rows of the prefill group under way (0: none)
    storing: bool = False  # prompt blocks wait to go into the prefix cache


@dataclass
class StepPlan:
    """What one step of the worker runs, in this order."""

    admit: list[Request] = field(default_factory=list)  # newcomers: they open a prefill group
    decode: bool = False  # every running row takes one token
    stage: Stage | None = None  # then one more stage: join the prefilled, store blocks, prefill
    prefill_tokens: int = 0  # the token budget of this step's prefill chunk (0: no limit)


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
        """The next step: admit (only when no group is prefilling), decode, then one stage."""
        admit = [] if load.prefill_rows else self._admit(load)
        prefill_rows = load.prefill_rows or len(admit)
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

    def _admit(self, load: BatchLoad) -> list[Request]:
        """Waiting requests, oldest first, while rows and reserved KV stay within the limits."""
        rows, tokens, admitted = load.running + load.prefilled, load.kv_tokens, []
        while self.waiting and rows < self.max_rows:
            need = self.waiting[0].kv_tokens
            # Alone, a request runs whatever it reserves: the context check at submit bounds it.
            if rows and tokens + need > self.kv_budget_tokens:
                break
            admitted.append(self.waiting.popleft())
            rows, tokens = rows + 1, tokens + need
        return admitted

    def _prefill_budget(self, prefill_rows: int, running: int) -> int:
        """Tokens for one prefill chunk: whole prompts when nothing runs, else chunks.

        A chunk pauses the running streams so that the new ones start sooner. One long prompt
        against three running streams gets ``chunk_tokens``; a classroom of 29 newcomers
        against one running stream gets 29 times that: the pause is weighed against the
        number of streams that wait for their first token.
        """
        if not running or not prefill_rows:
            return 0
        return self.chunk_tokens * max(1, math.ceil(prefill_rows / running))
