"""``BatchingEngine``: continuous batching over a shared KV cache, prefix reuse, chunked prefill.

ONE worker thread loops: a decode step for the running rows (one token each), then one chunk of
the newcomers' prefill (starting after their cached prefix), then the new pieces go out and
finished or cancelled rows leave. A prefill group joins the running batch once its last chunk
is done. Each row keeps its own sampling parameters, stop strings and token budget.

Written by hand because no installed library does this on CPU: model.generate() runs one static
batch to the end (late arrivals wait for the slowest row), and transformers' own continuous
batching (generate_batch / paged attention) measured ~2x for 8 requests here, where this loop
reaches ~4.5x (see helpers/bench). Torch only: works unchanged on CUDA (tensors stay on
model.device). Depends on the ``TokenBatchable`` capability only, never on a concrete backend.
"""

from __future__ import annotations

import inspect
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from helpers.chat import GenerationParams, Message, TokenBatchable
from helpers.config import DEFAULT_PREFILL_CHUNK_TOKENS, DEFAULT_PREFIX_CACHE_MB
from helpers.server.engine.admission import Admission, Pending
from helpers.server.engine.base import Engine, EngineStoppedError, Finish, QueueFullError, Stream
from helpers.server.engine.kv import keep_rows, kv_tensors
from helpers.server.engine.prefill import PrefillGroup
from helpers.server.engine.prefix_cache import PrefixCache, reusable
from helpers.server.engine.rows import Row
from helpers.server.engine.sampling import pick_tokens


class BatchingEngine(Admission, Engine):
    """One worker thread; requests join the running batch between decode steps."""

    kind = "continuous-batching"

    def __init__(self, chat_model: TokenBatchable, max_batch_size: int = 16, max_queue: int = 64,
                 prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB,
                 prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS) -> None:
        if not chat_model.can_batch:
            raise ValueError("this model cannot batch (remote model.chat); use ThreadedEngine")
        super().__init__(chat_model, max_queue)  # type: ignore[arg-type]
        self.batchable = chat_model
        self.model, self.tokenizer = chat_model.model, chat_model.tokenizer
        self.max_batch_size = max_batch_size
        self.chunk_tokens = max(1, prefill_chunk_tokens)
        self.eos = chat_model.eos_token_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.prefix_cache = (PrefixCache(prefix_cache_mb * 2**20)
                             if prefix_cache_mb > 0 and reusable(self.model.config) else None)
        self._pending: deque[Pending] = deque()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._rows: list[Row] = []
        self._cache: Any = None
        self._mask: Any = None  # [batch, cache length] of the running rows
        self._group: PrefillGroup | None = None
        self._group_rows: list[Row] = []
        self._ready: tuple[list[Row], Any, Any] | None = None  # prefilled, waiting to join
        self._to_store: list[tuple[Row, list[tuple[Any, Any]], Any, int, int]] = []  # joined, blocks not yet kept
        forward_params = inspect.signature(self.model.forward).parameters
        self._keep_logits = "logits_to_keep" in forward_params
        # transformers 5 renamed forward's past_key_values to cache; Colab may have either.
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"

    # Public side (any thread).

    def start(self) -> None:
        """Start the worker thread."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="dhllm-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still running end with EngineStoppedError."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, messages: Sequence[Message], params: GenerationParams,
               prompt_text: str | None = None) -> Stream:
        """Queue one request; ``prompt_text`` is a prompt already in the model's format."""
        if prompt_text is None:
            prompt_ids = self.batchable.prompt_ids(messages)  # validates; ValueError if bad
        else:
            prompt_ids = self.batchable.raw_prompt_ids(prompt_text)
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
            self._pending.append((stream, list(prompt_ids), params))
            self.stats.submitted += 1
            self.stats.waiting = len(self._pending)
            self._wake.notify()
        return stream

    # Worker thread: the loop.

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while (joining := self._next_work()) is not None:
                if joining:
                    self._start_group(joining)
                if self._rows:  # running streams first: their pieces go out before the rest
                    self._guarded(self._decode_step, self._take_rows)
                # A prefilled group joins in an iteration of its own, after a decode step: the
                # join copies the whole batch's KV, and doing it right after the last chunk
                # would add both to one pause of the running streams.
                if self._ready is not None:
                    self._guarded(self._join_ready, lambda: self._take_ready()[0])
                elif self._to_store:  # copying a long prompt's blocks is a stage of its own too
                    self._guarded(self._store_prompts, list)
                elif self._group is not None:
                    self._guarded(self._prefill_chunk, self._take_group)
            self._shut_down()

    def _next_work(self) -> list[Pending] | None:
        """Wait for work; the newcomers to prefill next ([] if none or a group is running)."""
        with self._wake:
            while not (self._stopping or self._pending or self._rows or self._group
                       or self._ready or self._to_store):
                self._wake.wait()
            if self._stopping:
                return None
            if self._group is not None:
                return []  # newcomers wait: one prefill group at a time
            room = self.max_batch_size - len(self._rows) - len(self._ready[0] if self._ready else [])
            joining = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
            self.stats.waiting = len(self._pending)
            return joining

    def _guarded(self, work: Callable[[], None], lose: Callable[[], list[Row]]) -> None:
        """Run one stage and send the new pieces; on failure fail only the rows ``lose`` takes."""
        try:
            work()
            self._emit_and_prune()
        except Exception as exc:  # e.g. out of memory; the loop lives on for the next requests
            self._fail(lose(), exc)

    def _take_rows(self) -> list[Row]:
        rows, self._rows, self._cache, self._mask = self._rows, [], None, None
        return rows

    def _take_group(self) -> list[Row]:
        rows, self._group, self._group_rows = self._group_rows, None, []
        return rows

    def _take_ready(self) -> tuple[list[Row], Any, Any]:
        ready, self._ready = self._ready, None
        return ready if ready is not None else ([], None, None)

    def _shut_down(self) -> None:
        error = EngineStoppedError("the server is shutting down")
        self._fail(self._take_rows() + self._take_group() + self._take_ready()[0], error)
        with self._wake:
            for stream, prompt_ids, _ in self._pending:
                stream.close(Finish("error", len(prompt_ids), error=error))
            self._pending.clear()

    def _forward(self, input_ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._keep_logits else {}
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, **{self._cache_kwarg: cache}, **kwargs)
        return out.logits[:, -1, :].float()

    # Decode.

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
        self._pick(self._rows, logits)
        with self._lock:
            self.stats.decode_steps += 1
            self.stats.decode_steps_during_prefill += self._group is not None

    def _pick(self, rows: list[Row], logits: Any) -> None:
        import torch

        tokens = pick_tokens(logits, [r.params for r in rows], [r.generator for r in rows],
                             [r.seen for r in rows])
        for r, token, t in zip(rows, tokens.tolist(), tokens, strict=True):
            r.next_token, r.fresh = token, True
            r.tokens.append(token)
            if r.params.repetition_penalty != 1.0:
                r.seen = torch.cat([r.seen, t.view(1)])

    def _emit_and_prune(self) -> None:
        """Send each row's new text; drop finished and cancelled rows from the batch."""
        keep = []
        for i, r in enumerate(self._rows):
            r.emit(self.eos)
            if r.finish_reason is None:
                keep.append(i)
            else:
                self._remember(r, kv_tensors(self._cache), self._mask[i], i, r.position)
                self._finish(r)
        with self._lock:
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._rows))
            self.stats.running = len(keep)
            self.stats.prefilling = len(self._group_rows) + len(self._ready[0] if self._ready else [])
        if len(keep) < len(self._rows):
            self._prune(keep)

    def _prune(self, keep: list[int]) -> None:
        """Keep only these rows of the running batch."""
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._rows = [self._rows[i] for i in keep]
        self._mask = keep_rows(self._cache, self._mask, keep)

    def _finish(self, r: Row) -> None:
        with self._lock:
            self.stats.completion_tokens += len(r.tokens)
            if r.finish_reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.completed += 1
        r.stream.close(Finish(r.finish_reason or "stop", len(r.prompt_ids), len(r.tokens),
                              cached_tokens=r.cached))

    def _fail(self, rows: list[Row], exc: BaseException) -> None:
        with self._lock:
            self.stats.errors += len(rows)
            self.stats.running = len(self._rows)
            self.stats.prefilling = len(self._group_rows) + len(self._ready[0] if self._ready else [])
        for r in rows:
            r.stream.close(Finish("error", len(r.prompt_ids), len(r.tokens), error=exc,
                                  cached_tokens=r.cached))
