"""The serving engine: generation runs in worker threads, never on the event loop.

Two engines share one interface (``submit`` -> ``Stream``):

- ``BatchingEngine`` for a local transformers model: ONE worker thread runs a continuous-batching
  decode loop. New requests are prefilled (left-padded) and joined onto the running batch between
  decode steps; each row keeps its own sampling parameters, stop strings and token budget;
  finished or cancelled rows leave after every step. On a 2-core CPU this turns 8 concurrent
  clients into ~4.5x the aggregate tokens/s of one client, where one request at a time stays at 1x.
- ``ThreadedEngine`` for any other ChatModel (cloud backends, remote-code ``model.chat``): each
  request's ``stream()`` runs in a bounded thread pool.

Both keep a bounded queue: when it is full, ``submit`` raises ``QueueFullError`` (the server
answers 503 with Retry-After) instead of letting a client hang.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from helpers.chat.base import (
    ChatModel,
    GenerationParams,
    Message,
    TokenBatchable,
    validate_messages,
)
from helpers.chat.decoding import IncrementalDecoder, StopMatcher


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


# ---------------------------------------------------------------------------------------------
# A request's output channel: filled by a worker thread, read from asyncio or from a thread.


@dataclass
class Finish:
    """The end of a stream: why it ended and the token counts."""

    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None
    cached_tokens: int = 0  # prompt tokens served from a prefix cache


class Stream:
    """Text pieces of one request, readable with ``async for`` or a plain ``for``."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.cancelled = threading.Event()
        self.finish: Finish | None = None
        self.first_piece_at: float | None = None
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
        if self.first_piece_at is None:
            self.first_piece_at = time.perf_counter()
        self._put(piece)

    def close(self, finish: Finish) -> None:
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
    """Counters a test or a dashboard can read (updated by the worker thread)."""

    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    errors: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_steps: int = 0
    prefills: int = 0
    max_batch_seen: int = 0
    running: int = 0
    waiting: int = 0

    def as_dict(self) -> dict[str, int]:
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


def create_engine(
    chat_model: ChatModel, max_batch_size: int = 16, max_queue: int = 64, max_workers: int = 4
) -> Engine:
    """The batching engine for a local model that can batch, the threaded one otherwise."""
    if isinstance(chat_model, TokenBatchable) and chat_model.can_batch:
        return BatchingEngine(chat_model, max_batch_size=max_batch_size, max_queue=max_queue)
    if isinstance(chat_model, TokenBatchable):
        max_workers = 1  # one local model, one generate at a time (it holds a lock anyway)
    return ThreadedEngine(chat_model, max_workers=max_workers, max_queue=max_queue)


# ---------------------------------------------------------------------------------------------
# Any ChatModel: stream() in a bounded thread pool.


class ThreadedEngine(Engine):
    """Runs ``chat_model.stream()`` in at most ``max_workers`` threads; more requests wait."""

    kind = "threaded"

    def __init__(self, chat_model: ChatModel, max_workers: int = 4, max_queue: int = 64) -> None:
        super().__init__(chat_model, max_queue)
        self.max_workers = max_workers
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="dhllm-chat")

    def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, messages: Sequence[Message], params: GenerationParams,
               prompt_text: str | None = None) -> Stream:
        messages = validate_messages(messages)
        if self._pool is None:
            raise EngineStoppedError("the engine is not running")
        with self._lock:
            if self.stats.waiting >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"{self.stats.waiting} requests are waiting; try again soon")
            self.stats.submitted += 1
            self.stats.waiting += 1
        stream = Stream()
        self._pool.submit(self._run, stream, messages, params)
        return stream

    def _run(self, stream: Stream, messages: list[dict[str, str]], params: GenerationParams) -> None:
        with self._lock:
            self.stats.waiting -= 1
            self.stats.running += 1
        prompt_tokens = self.count_tokens(" ".join(m["content"] for m in messages))
        text, reason, error = "", "stop", None
        try:
            pieces = self.chat_model.stream(messages, **_params_kwargs(params))
            try:
                for piece in pieces:
                    if stream.cancelled.is_set():
                        reason = "cancelled"
                        break
                    text += piece
                    stream.put_text(piece)
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()  # stops a local generate thread at once
        except BaseException as exc:  # handed to the reader, who maps it to an HTTP status
            reason, error = "error", exc
        completion = self.count_tokens(text)
        if reason == "stop" and completion >= params.max_new_tokens:
            reason = "length"
        with self._lock:
            self.stats.running -= 1
            self.stats.prompt_tokens += prompt_tokens
            self.stats.completion_tokens += completion
            if reason == "cancelled":
                self.stats.cancelled += 1
            elif reason == "error":
                self.stats.errors += 1
            else:
                self.stats.completed += 1
        stream.close(Finish(reason, prompt_tokens, completion, error))


def _params_kwargs(params: GenerationParams) -> dict[str, Any]:
    kwargs = dict(vars(params))
    if not kwargs["stop"]:
        kwargs.pop("stop")
    return {k: v for k, v in kwargs.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# A local transformers model: continuous batching over a shared KV cache.
#
# Written by hand because no installed library does this on CPU: model.generate() runs one static
# batch to the end (late arrivals wait for the slowest row), and transformers' own continuous
# batching (generate_batch / paged attention) measured ~2x for 8 requests here, where this loop
# reaches ~4.5x (see helpers/bench.py). Torch only: works unchanged on CUDA (tensors stay on
# model.device).


@dataclass
class _Row:
    """One request inside the running batch."""

    stream: Stream
    prompt_ids: list[int]
    params: GenerationParams
    decoder: IncrementalDecoder
    stopper: StopMatcher
    generator: Any  # torch.Generator or None (then the global RNG)
    seen: Any = None  # torch tensor of prompt + generated ids, for the repetition penalty
    generated: int = 0
    position: int = 0  # position id of the next input token
    next_token: int = 0
    fresh: bool = False  # next_token is picked but not yet emitted
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)


class BatchingEngine(Engine):
    """One worker thread; requests join the running batch between decode steps."""

    kind = "continuous-batching"

    def __init__(
        self, chat_model: TokenBatchable, max_batch_size: int = 16, max_queue: int = 64
    ) -> None:
        if not chat_model.can_batch:
            raise ValueError("this model cannot batch (remote model.chat); use ThreadedEngine")
        super().__init__(chat_model, max_queue)
        self.model = chat_model.model
        self.tokenizer = chat_model.tokenizer
        self.max_batch_size = max_batch_size
        self.eos = chat_model.eos_token_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._pending: deque[tuple[Stream, list[int], GenerationParams]] = deque()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Any = None  # [batch, cache length + 1] once a step is prepared
        forward_params = inspect.signature(self.model.forward).parameters
        self._keep_logits = "logits_to_keep" in forward_params
        # transformers 5 renamed forward's past_key_values to cache; Colab may have either.
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"

    # Public side (any thread).

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="dhllm-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, messages: Sequence[Message], params: GenerationParams,
               prompt_text: str | None = None) -> Stream:
        if prompt_text is None:
            prompt_ids = self.chat_model.prompt_ids(messages)  # validates; ValueError if bad
        else:
            prompt_ids = self.chat_model.raw_prompt_ids(prompt_text)
        if not prompt_ids:
            raise ValueError("messages: the prompt is empty after rendering")
        if self.max_positions and len(prompt_ids) + params.max_new_tokens > self.max_positions:
            raise ValueError(
                f"messages: the prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                f"({params.max_new_tokens}) exceeds the model's context of {self.max_positions}"
            )
        stream = Stream()
        with self._wake:
            if self._thread is None or self._stopping:
                raise EngineStoppedError("the engine is not running")
            if len(self._pending) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(
                    f"{len(self._pending)} requests are waiting for the model; try again soon",
                    retry_after=1.0,
                )
            self._pending.append((stream, prompt_ids, params))
            self.stats.submitted += 1
            self.stats.waiting = len(self._pending)
            self._wake.notify()
        return stream

    # Worker thread.

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._pending and not self._rows:
                        self._wake.wait()
                    if self._stopping:
                        break
                    room = self.max_batch_size - len(self._rows)
                    joining = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                    self.stats.waiting = len(self._pending)
                # Drop cancelled waiters before spending a prefill on them.
                live = [j for j in joining if not j[0].cancelled.is_set()]
                for stream, prompt_ids, _ in joining:
                    if stream.cancelled.is_set():
                        self._count("cancelled")
                        stream.close(Finish("cancelled", len(prompt_ids)))
                if live:  # newcomers first: they join the running batch before its next step
                    try:
                        self._prefill(live)
                    except Exception as exc:  # e.g. out of memory: fail the newcomers only
                        for stream, prompt_ids, _ in live:
                            self._count("errors")
                            stream.close(Finish("error", len(prompt_ids), error=exc))
                try:
                    if not live and self._rows:
                        self._decode_step()
                    self._emit_and_prune()
                except Exception as exc:  # the batch is lost; the loop lives on for the next ones
                    self._fail_all(exc)
            self._fail_all(EngineStoppedError("the server is shutting down"))
            with self._wake:
                for stream, prompt_ids, _ in self._pending:
                    stream.close(Finish("error", len(prompt_ids), error=EngineStoppedError(
                        "the server is shutting down")))
                self._pending.clear()

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.stats, what, getattr(self.stats, what) + n)

    def _forward(self, input_ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._keep_logits else {}
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, **{self._cache_kwarg: cache}, **kwargs)
        return out.logits[:, -1, :].float()

    def _prefill(self, joining: list[tuple[Stream, list[int], GenerationParams]]) -> None:
        """Run the new prompts (left-padded together), then merge them into the running batch."""
        import torch
        from transformers import DynamicCache

        device = self.model.device
        width = max(len(ids) for _, ids, _ in joining)
        input_ids = torch.full((len(joining), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(joining), width), dtype=torch.long)
        rows = []
        for i, (stream, ids, params) in enumerate(joining):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=device)
                generator.manual_seed(params.seed)
            rows.append(_Row(
                stream=stream, prompt_ids=ids, params=params,
                decoder=IncrementalDecoder(self.tokenizer),
                stopper=StopMatcher(params.stop + self.chat_model.default_stop),
                generator=generator, seen=torch.tensor(ids, device=device), position=len(ids),
            ))
        input_ids, mask = input_ids.to(device), mask.to(device)
        # Position ids count real tokens only, so a left-padded row sees the same positions as alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(input_ids, mask, positions, cache)
        self._pick_tokens(rows, logits)
        self._count("prefills")
        self._count("prompt_tokens", sum(len(r.prompt_ids) for r in rows))
        self._merge(rows, cache, mask)

    def _merge(self, rows: list[_Row], cache: Any, mask: Any) -> None:
        """Append new rows to the batch: left-pad the shorter KV cache so both have one length."""
        import torch
        from transformers import DynamicCache

        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)

        def pad_left(t: Any, length: int) -> Any:
            if length == width:
                return t
            shape = list(t.shape)
            shape[-2 if t.dim() == 4 else -1] = width - length
            return torch.cat([t.new_zeros(shape), t], dim=-2 if t.dim() == 4 else -1)

        layers = []
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            keys = torch.cat([pad_left(old.keys, old_len), pad_left(new.keys, new_len)])
            values = torch.cat([pad_left(old.values, old_len), pad_left(new.values, new_len)])
            layers.append((keys, values))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([pad_left(self._mask, old_len), pad_left(mask, new_len)])
        self._rows = self._rows + rows

    def _decode_step(self) -> None:
        """One token for every running row."""
        import torch

        device = self.model.device
        input_ids = torch.tensor([[r.next_token] for r in self._rows], device=device)
        positions = torch.tensor([[r.position] for r in self._rows], device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        logits = self._forward(input_ids, self._mask, positions, self._cache)
        for r in self._rows:
            r.position += 1
        self._pick_tokens(self._rows, logits)
        self._count("decode_steps")

    def _pick_tokens(self, rows: list[_Row], logits: Any) -> None:
        """Per-row repetition penalty, temperature, top-k, top-p and seed; then the next token."""
        import torch

        x = logits
        penalised = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        if penalised:  # as transformers: divide positive scores, multiply negative ones
            x = x.clone()
            for i in penalised:
                penalty, seen = rows[i].params.repetition_penalty, rows[i].seen
                score = x[i].gather(0, seen)
                x[i].scatter_(0, seen, torch.where(score < 0, score * penalty, score / penalty))
        # Extreme parameters (a penalty of 1e-300, say) overflow to inf/nan: keep the scores usable.
        x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max)
        tokens = torch.empty(len(rows), dtype=torch.long, device=x.device)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if greedy:
            index = torch.tensor(greedy, device=x.device)
            tokens[index] = x[index].argmax(-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            index = torch.tensor(sampled, device=x.device)
            # A temperature below 1e-4 behaves like greedy anyway; the floor avoids inf scores.
            temperature = torch.tensor([max(rows[i].params.temperature, 1e-4) for i in sampled],
                                       device=x.device, dtype=x.dtype)
            y = x[index] / temperature.unsqueeze(1)
            y = torch.nan_to_num(y, nan=float("-inf"), posinf=torch.finfo(y.dtype).max)
            for j, i in enumerate(sampled):
                p = rows[i].params
                if p.top_k or p.top_p < 1.0:
                    if p.top_k:
                        values, order = y[j].topk(min(p.top_k, y.shape[1]))
                    else:
                        values, order = y[j].sort(descending=True)
                    if p.top_p < 1.0:
                        probs = values.softmax(-1)
                        keep = (probs.cumsum(-1) - probs) < p.top_p  # always keeps the first
                        values, order = values[keep], order[keep]
                    filtered = torch.full_like(y[j], float("-inf"))
                    filtered[order] = values
                    y[j] = filtered
            probs = y.softmax(-1)
            # One multinomial call for rows on the global RNG; seeded rows use their own generator.
            shared = [j for j, i in enumerate(sampled) if rows[i].generator is None]
            if shared:
                tokens[index[shared]] = torch.multinomial(probs[shared], 1).squeeze(1)
            for j, i in enumerate(sampled):
                if rows[i].generator is not None:
                    tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
        for r, token, t in zip(rows, tokens.tolist(), tokens, strict=True):
            r.next_token = token
            r.fresh = True
            r.generated += 1
            if r.params.repetition_penalty != 1.0:
                r.seen = torch.cat([r.seen, t.view(1)])

    def _emit_and_prune(self) -> None:
        """Send each row's new text; drop finished and cancelled rows from the batch."""
        keep = []
        for i, r in enumerate(self._rows):
            if r.stream.cancelled.is_set():
                r.finish_reason = "cancelled"
            elif not r.fresh:
                pass
            elif r.next_token in self.eos:
                r.finish_reason = "stop"
            else:
                r.fresh = False
                piece = r.stopper.push(r.decoder.push(r.next_token))
                if piece:
                    r.stream.put_text(piece)
                if r.stopper.stopped:
                    r.finish_reason = "stop"
                elif r.generated >= r.params.max_new_tokens:
                    r.finish_reason = "length"
                    tail = r.stopper.flush()
                    if tail:
                        r.stream.put_text(tail)
            if r.finish_reason is None:
                keep.append(i)
            else:
                self._finish(r)
        with self._lock:
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._rows))
            self.stats.running = len(keep)
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        import torch

        index = torch.tensor(keep, device=self._mask.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row are dead weight: cut them.
        first = int(self._mask.any(0).long().argmax())
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]

    def _finish(self, r: _Row) -> None:
        with self._lock:
            self.stats.completion_tokens += r.generated
            if r.finish_reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.completed += 1
        r.stream.close(Finish(r.finish_reason or "stop", len(r.prompt_ids), r.generated))

    def _fail_all(self, exc: BaseException) -> None:
        rows, self._rows, self._cache, self._mask = self._rows, [], None, None
        for r in rows:
            with self._lock:
                self.stats.errors += 1
            r.stream.close(Finish("error", len(r.prompt_ids), r.generated, error=exc))
        with self._lock:
            self.stats.running = 0
