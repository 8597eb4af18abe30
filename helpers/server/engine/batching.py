"""``BatchingEngine``: continuous batching over a shared KV cache, prefix reuse, chunked prefill.

Composed as vLLM's v1 engine core is: each step the ``Scheduler`` returns a ``StepPlan``
(admit newcomers, decode, then join / store / prefill), the ``KVManager`` holds every KV tensor
and the prefix cache, and the ``ModelRunner`` runs the model. ONE worker thread carries the plans
out. Each stage takes the rows it works on from the KV manager's named state, and when a stage
fails (out of memory, say) exactly those rows end with the error; the others go on.

Written by hand because no installed library does this on CPU: model.generate() runs one static
batch to the end (late arrivals wait for the slowest row), and transformers' own continuous
batching (generate_batch / paged attention) measured ~2x for 8 requests here, where this loop
reaches ~4.5x (see helpers/bench). Torch only: works unchanged on CUDA (tensors stay on
model.device). Depends on the ``TokenBatchable`` capability only, never on a concrete backend.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from helpers.chat import GenerationParams, Message, TokenBatchable
from helpers.config import Settings, get_settings
from helpers.models.cpu_threads import release_openmp_threads
from helpers.server.engine.base import Engine, EngineStoppedError, Finish, Stream
from helpers.server.engine.kv import kv_bytes_per_token
from helpers.server.engine.kv_manager import KVManager, Prefilling
from helpers.server.engine.kv_slots import SlotLimits
from helpers.server.engine.prefix_cache import PrefixCache, reusable
from helpers.server.engine.rows import Row
from helpers.server.engine.runner import ModelRunner
from helpers.server.engine.scheduler import PATIENCE, Request, Scheduler, StepPlan

log = logging.getLogger(__name__)
# A worker whose loop fails goes on with the next requests, unless it failed CRASH_LIMIT times
# within CRASH_WINDOW_S seconds: then it stops, and submit refuses with a 503.
CRASH_LIMIT = 3
CRASH_WINDOW_S = 60.0


class BatchingEngine(Engine):
    """One worker thread; requests join the running batch between decode steps.

    Limits come from ``settings`` (``helpers.config.Settings``: ``max_batch_size``,
    ``kv_cache_mb``, ``prefix_cache_mb``, ``prefill_chunk_tokens``, ``max_queue``); keyword
    ``overrides`` replace single fields, e.g. ``BatchingEngine(chat, max_batch_size=8)``.
    """

    kind = "continuous-batching"

    def __init__(self, chat_model: TokenBatchable, settings: Settings | None = None,
                 **overrides: Any) -> None:
        if not chat_model.can_batch:
            raise ValueError("this model cannot batch (remote model.chat); use ThreadedEngine")
        unknown = set(overrides) - set(Settings.model_fields)
        if unknown:
            raise TypeError(f"not a setting: {', '.join(sorted(unknown))}")
        settings = (settings or get_settings()).model_copy(update=overrides)
        super().__init__(chat_model, settings.max_queue)  # type: ignore[arg-type]
        self.batchable = chat_model
        model, self.tokenizer = chat_model.model, chat_model.tokenizer
        self.eos = chat_model.eos_token_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.kv_budget_tokens = int(settings.kv_cache_mb * 2**20
                                    // kv_bytes_per_token(model.config, model.dtype))
        self.scheduler = Scheduler(settings.max_batch_size, self.kv_budget_tokens,
                                   settings.prefill_chunk_tokens, settings.max_queue)
        prefix_cache = (PrefixCache(int(settings.prefix_cache_mb * 2**20))
                        if settings.prefix_cache_mb > 0 and reusable(model.config) else None)
        self.kv = KVManager(prefix_cache, self._count,
                            SlotLimits(settings.max_batch_size, self.kv_budget_tokens))
        self.runner = ModelRunner(model, settings.max_batch_size, pack=settings.cpu_packed_linear)
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: BaseException | None = None  # why the worker died, if it did

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The prefix (KV) cache, None when off."""
        return self.kv.prefix_cache

    # Public side (any thread).

    def start(self, timeout: float = 10.0) -> None:
        """Start the worker thread; one at most (a worker still stopping is waited for)."""
        with self._lock:
            old = self._thread
            if old is not None and old.is_alive() and not self._stopping:
                return
        if old is not None:
            old.join(timeout)  # a stop() that timed out: its worker may still be in a step
            if old.is_alive():
                raise EngineStoppedError("the previous worker is still stopping; try again soon")
        # Loading, packing or the caller's own calls left this thread an OpenMP team: free it,
        # the model runs in the worker's team only from here (see cpu_threads).
        release_openmp_threads()
        with self._lock:
            self._stopping, self._failure = False, None
            self._thread = threading.Thread(target=self._loop, name="dhllm-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still running end with EngineStoppedError.

        A worker that is still in a step after ``timeout`` seconds ends its streams when the step
        returns; ``start()`` waits for it, so two workers never share the KV manager.
        """
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

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
        request = Request(Stream(), list(prompt_ids), params)
        if not self.scheduler.fits_alone(request):
            raise ValueError(
                f"messages: the prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                f"({params.max_new_tokens}) needs more KV cache than this server holds "
                f"({self.kv_budget_tokens} tokens, DHLLM_KV_CACHE_MB); shorten the prompt or "
                f"lower max_tokens"
            )
        stream = request.stream
        with self._wake:
            if self._failure is not None:
                raise EngineStoppedError(f"the engine's worker stopped after an error "
                                         f"({type(self._failure).__name__}); restart the server")
            if self._thread is None or self._stopping or not self._thread.is_alive():
                raise EngineStoppedError("the engine is not running")
            try:
                self.scheduler.add(request)
            except Exception:
                self.stats.rejected += 1
                raise
            self.stats.submitted += 1
            self.stats.waiting = len(self.scheduler.waiting)
            self._wake.notify()
        return stream

    # Worker thread: the loop carries out one plan per step.

    def _loop(self) -> None:
        import torch

        error: BaseException = EngineStoppedError("the server is shutting down")
        failures: list[float] = []  # when the loop failed recently (a crash loop gives up)
        while True:
            try:
                with torch.inference_mode():
                    while (plan := self._next_plan()) is not None:
                        self._step(plan)
                break
            except Exception as exc:  # a bug outside every stage's guard: no stream may hang
                now = time.monotonic()
                failures = [t for t in failures if now - t < CRASH_WINDOW_S] + [now]
                if len(failures) >= CRASH_LIMIT:
                    log.exception("the engine's worker failed %d times in %.0f s; it stops, "
                                  "and every open request ends with the error", CRASH_LIMIT,
                                  CRASH_WINDOW_S)
                    error = self._failure = exc
                    break
                # One failure: end what was open (its state may be broken), then serve again.
                log.exception("the engine's worker failed; every open request ends with the "
                              "error, and it goes on with the next ones")
                self._end_all(exc)
            except BaseException as exc:  # SystemExit, KeyboardInterrupt: stop for good
                error = self._failure = exc
                break
        self._shut_down(error)

    def _next_plan(self) -> StepPlan | None:
        """Wait for work, then ask the scheduler for the next step (None: stop)."""
        with self._wake:
            while not (self._stopping or self.scheduler.waiting or self.kv.busy()):
                self._wake.wait()
            if self._stopping:
                return None
            plan = self.scheduler.plan(self.kv.load())
            self.stats.waiting = len(self.scheduler.waiting)
            return plan

    def _step(self, plan: StepPlan) -> None:
        """Admit, decode (running streams first), then the one other stage of this step."""
        if plan.admit:
            self._admit(plan.admit)
        if plan.decode:
            self._run_stage(lambda: self.kv.advance(self.runner.decode(self.kv.running)),
                            self.kv.take_running)
            with self._lock:
                self.stats.decode_steps += 1
                self.stats.decode_steps_during_prefill += bool(self.kv.prefilling)
        # A prefilled group joins in a step of its own, after a decode step: the join copies
        # the whole batch's KV, and doing it right after the last chunk would add both to one
        # pause of the running streams. Storing a long prompt's blocks is a stage of its own too.
        if plan.stage == "join":
            for prefilled in self.kv.take_prefilled():
                for r in prefilled.rows:
                    if r.finish_reason is not None:  # one token was all it needed
                        self._finish(r)
                self._run_stage(lambda p=prefilled: self.kv.join(p), lambda p=prefilled: [
                    r for r in p.rows if r.finish_reason is None])
        elif plan.stage == "store":
            for blocks in self.kv.take_blocks():
                self.kv.store(blocks)
        elif plan.stage == "prefill":
            self._prefill(plan.prefill_tokens)
        self._update_gauges()

    def _run_stage(self, work: Callable[[], None], take_rows: Callable[[], list[Row]]) -> None:
        """Run one stage (``work``), then send the new pieces.

        If it raises, ``take_rows()`` takes the rows that stage held out of the KV manager and
        exactly those end with the error; every other row goes on.
        """
        try:
            work()
        except Exception as exc:  # e.g. out of memory; the loop lives on for the next requests
            log.exception("an engine stage failed; its rows end with the error")
            self._fail(take_rows(), exc)
        self._emit_and_prune()

    def _admit(self, requests: list[Request]) -> None:
        """Turn live newcomers into rows and open their prefill group (prefix lookup first)."""
        rows = []
        for req in requests:
            if req.stream.cancelled.is_set():  # gone while waiting: spend no prefill on it
                self._count("cancelled")
                req.stream.close(Finish("cancelled", len(req.prompt_ids)))
                continue
            try:
                row = Row.new(req.stream, req.prompt_ids, req.params, self.batchable)
                self.runner.admit(row)
                rows.append(row)
            except Exception as exc:  # this request only
                self._count("errors")
                req.stream.close(Finish("error", len(req.prompt_ids), error=exc))
        if rows:
            self._run_stage(lambda: self.kv.open_group(rows, self.pad_id, self.runner.device),
                        lambda: rows)

    def _prefill(self, budget: int | None) -> None:
        """Prefill groups take chunks within this step's token ``budget`` (None: all of them).

        As in vLLM's chunked-prefill scheduling, one token budget per step is shared by every
        prompt under way, so an arrival never waits for an earlier prompt's whole prefill. The
        group with the least left goes first (a short question overtakes a long document), and
        the next one gets what the budget has left. Each group is a forward pass of its own
        here (vLLM packs them into one), so most steps run one; a group that got nothing for
        ``PATIENCE`` steps goes first.
        """
        for r in self.kv.drop_cancelled():  # their partial KV is never stored
            r.finish_reason = "cancelled"
            self._finish(r)
        groups = sorted(self.kv.prefilling,
                        key=lambda p: (p.waited < PATIENCE, p.group.remaining))
        left = budget
        for prefilling in groups:
            if left is not None and left <= 0:
                prefilling.waited += 1
                continue
            before, prefilling.waited = prefilling.group.remaining, 0
            self._run_stage(lambda p=prefilling, b=left: self._prefill_chunk(p, b),
                            lambda p=prefilling: self.kv.take_group(p))
            if left is not None:
                left -= before - prefilling.group.remaining

    def _prefill_chunk(self, prefilling: Prefilling, budget: int | None) -> None:
        """One chunk of one group's prefill; after the last, its first tokens go out."""
        done = self.runner.prefill_chunk(prefilling, budget)
        self._count("prefill_chunks")
        if not done:
            return
        for r in prefilling.rows:
            r.emit(self.eos)  # the first token goes out now; joining the batch comes next
        self._count("prefills")
        self._count("prompt_tokens", sum(len(r.prompt_ids) for r in prefilling.rows))
        self.kv.finish_prefill(prefilling)

    def _emit_and_prune(self) -> None:
        """Send each running row's new text; the KV manager lets the ended rows go; close them."""
        rows = self.kv.running.rows
        for r in rows:
            try:
                r.emit(self.eos)
            except Exception as exc:  # e.g. a tokenizer that cannot decode: this row only
                self._fail([r], exc)
        with self._lock:
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(rows))
        try:
            ended = self.kv.update_from_output()
        except Exception as exc:  # the rows that ended keep their end; the others fail
            for r in rows:
                if r.finish_reason is not None:
                    self._finish(r)
            self._fail(self.kv.take_running(), exc)
            return
        if ended:
            self._update_gauges()  # the blocks are stored before a client hears the end
        for r in ended:
            self._finish(r)  # (a row that failed above is closed already)

    def _shut_down(self, error: BaseException) -> None:
        """End every open and queued stream with ``error``; ``submit`` refuses from now on."""
        with self._wake:
            self._stopping = True  # before the drain: nothing joins the queue after it
        self._end_all(error)

    def _end_all(self, error: BaseException) -> None:
        """End every open and queued stream with ``error``; drop the prefix cache with them."""
        with self._wake:
            queued = self.scheduler.drain()
            self.stats.waiting = 0
        self._fail(self.kv.take_running() + self.kv.take_prefilling()
                   + [r for p in self.kv.take_prefilled() for r in p.rows], error)
        self._count("errors", len(queued))
        for req in queued:
            req.stream.close(Finish("error", len(req.prompt_ids), error=error))
        self.kv.take_blocks()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()  # memory a stopped server gives back; maybe inconsistent
            with self._lock:
                self.stats.cache_bytes = self.stats.cache_blocks = 0

    def _update_gauges(self) -> None:
        cache = self.prefix_cache
        with self._lock:
            self.stats.running = len(self.kv.running.rows)
            self.stats.prefilling = self.kv.rows_prefilling()
            self.stats.kv_slot_tokens = self.kv.slot_tokens()
            if cache is not None:
                self.stats.cache_bytes, self.stats.cache_blocks = cache.bytes, len(cache)
                self.stats.cache_evictions = cache.evictions

    def _finish(self, r: Row) -> None:
        """Close a row that ended by itself (stop, length, cancelled); once only."""
        if r.closed:
            return
        r.closed = True
        self.runner.release(r)
        with self._lock:
            self.stats.completion_tokens += len(r.tokens)
            if r.finish_reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.completed += 1
        r.stream.close(Finish(r.finish_reason or "stop", len(r.prompt_ids), len(r.tokens),
                              cached_tokens=r.cached))

    def _fail(self, rows: list[Row], exc: BaseException) -> None:
        """End these rows with ``exc``; rows already closed keep their Finish."""
        rows = [r for r in rows if not r.closed]
        self._count("errors", len(rows))
        for r in rows:
            r.closed, r.finish_reason = True, "error"
            self.runner.release(r)
            r.stream.close(Finish("error", len(r.prompt_ids), len(r.tokens), error=exc,
                                  cached_tokens=r.cached))
