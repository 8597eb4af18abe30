"""What every engine shares: the ``Stream`` a request reads, its ``Finish``, the counters, errors.

Both engines keep a bounded queue: when it is full, ``submit`` raises ``QueueFullError`` (the
server answers 503 with Retry-After) instead of letting a client hang.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

from helpers.chat import ChatModel, GenerationParams, Message


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry after ``retry_after`` seconds."""

    status_code = 503

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineStoppedError(RuntimeError):
    """The engine is not running (the server is shutting down)."""

    status_code = 503
    retry_after = 5.0


@dataclass
class Finish:
    """The end of a stream: why it ended and the token counts."""

    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not recomputed)


class Stream:
    """Text pieces of one request, readable with ``async for`` or a plain ``for``."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.cancelled = threading.Event()
        self.finish: Finish | None = None
        # The reader sends the reply only once it is whole (not streamed): an engine may then
        # run a failed request again from scratch (vLLM behind a router: on another replica).
        self.buffered = False
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._aqueue: asyncio.Queue[str | Finish] = asyncio.Queue()
        except RuntimeError:  # no running loop: a synchronous caller (tests, benchmarks)
            self._loop = None
            self._queue: queue.Queue[str | Finish] = queue.Queue()

    # Worker side.
    def _put(self, item: str | Finish) -> None:
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody will read this stream any more
            self.cancelled.set()

    def put_text(self, piece: str) -> None:
        """Hand one decoded piece to the reader."""
        self._put(piece)

    def close(self, finish: Finish) -> None:
        """End the stream."""
        self._put(finish)

    # Reader side.
    def cancel(self) -> None:
        """Stop this request's generation (the client went away); harmless after the end."""
        self.cancelled.set()

    def _take(self, item: str | Finish) -> str | None:
        if isinstance(item, Finish):
            self.finish = item
            if item.error is not None:
                raise item.error
            return None
        return item

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while self.finish is None:
                piece = self._take(await self._aqueue.get())
                if piece is not None:
                    yield piece
        finally:
            if self.finish is None:
                self.cancel()

    def __iter__(self) -> Iterator[str]:
        try:
            while self.finish is None:
                piece = self._take(self._queue.get())
                if piece is not None:
                    yield piece
        finally:
            if self.finish is None:
                self.cancel()

    async def text(self) -> str:
        """The whole reply (async)."""
        return "".join([piece async for piece in self])


@dataclass
class EngineStats:
    """Counters a test or a dashboard can read (updated by the worker thread); all integers."""

    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    errors: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_steps: int = 0
    prefills: int = 0  # prefill groups finished (rows prefilled together, chunk by chunk)
    prefill_chunks: int = 0
    # Decode steps run while a prefill group was still between its chunks: proof that running
    # streams kept producing tokens during a long prompt's prefill.
    decode_steps_during_prefill: int = 0
    max_batch_seen: int = 0
    running: int = 0  # rows in the decode batch
    prefilling: int = 0  # rows admitted, their prompt still being prefilled
    waiting: int = 0
    kv_slot_tokens: int = 0  # token places the decode batch's KV slots hold (within the budget)
    # Prefix (KV) cache.
    cache_hits: int = 0  # requests that reused at least one cached block
    cached_tokens: int = 0  # prompt tokens not recomputed, summed over requests
    cache_bytes: int = 0  # bytes held now
    cache_blocks: int = 0  # blocks held now
    cache_evictions: int = 0  # blocks evicted to stay within the budget
    store_errors: int = 0  # block stores that failed (those blocks are lost, no reply is)

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (``/health`` shows it)."""
        return dict(vars(self))


class Engine:
    """The shared interface of both engines."""

    kind = "engine"

    def __init__(self, chat_model: ChatModel, max_queue: int = 64) -> None:
        self.chat_model = chat_model
        self.max_queue = max_queue
        self.stats = EngineStats()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the worker(s)."""

    def stop(self) -> None:
        """Stop the worker(s); requests still running end with EngineStoppedError."""

    def submit(self, messages: Sequence[Message], params: GenerationParams,
               prompt_text: str | None = None) -> Stream:
        """Queue one request; raise QueueFullError when the queue is full, ValueError on bad input.

        ``prompt_text``, when given, is the exact prompt for a local model (a Linly-template
        prompt used as is); backends that take messages only use ``messages``.
        """
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` for usage counts (a rough estimate without a tokenizer)."""
        tokenizer = getattr(self.chat_model, "tokenizer", None)
        if tokenizer is not None:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return max(1, len(text) // 4) if text else 0

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.stats, what, getattr(self.stats, what) + n)
