"""The serving engine: generation runs in worker threads, never on the event loop.

Two engines share one interface (``submit`` -> ``Stream``):

- ``BatchingEngine`` for a local model with the ``TokenBatchable`` capability: one worker
  thread runs a continuous-batching decode loop with prefix (KV) reuse and chunked prefill.
- ``ThreadedEngine`` for any other ChatModel (cloud backends, remote-code ``model.chat``): each
  request's ``stream()`` runs in a bounded thread pool.
"""

from __future__ import annotations

from helpers.chat import ChatModel, TokenBatchable
from helpers.server.engine.base import (
    Engine,
    EngineStats,
    EngineStoppedError,
    Finish,
    QueueFullError,
    Stream,
)
from helpers.server.engine.batching import BatchingEngine
from helpers.server.engine.prefix_cache import PrefixCache
from helpers.server.engine.threaded import ThreadedEngine

__all__ = [
    "BatchingEngine",
    "Engine",
    "EngineStats",
    "EngineStoppedError",
    "Finish",
    "PrefixCache",
    "QueueFullError",
    "Stream",
    "ThreadedEngine",
    "create_engine",
]


def create_engine(
    chat_model: ChatModel, max_batch_size: int = 16, max_queue: int = 64, max_workers: int = 4,
    prefix_cache_mb: int | None = None, prefill_chunk_tokens: int | None = None,
) -> Engine:
    """The batching engine for a local model that can batch, the threaded one otherwise.

    ``prefix_cache_mb`` / ``prefill_chunk_tokens`` left as None come from the settings
    (``DHLLM_PREFIX_CACHE_MB``, ``DHLLM_PREFILL_CHUNK_TOKENS``).
    """
    if isinstance(chat_model, TokenBatchable) and chat_model.can_batch:
        if prefix_cache_mb is None or prefill_chunk_tokens is None:
            from helpers.config import get_settings

            settings = get_settings()
            prefix_cache_mb = _default(prefix_cache_mb, settings.prefix_cache_mb)
            prefill_chunk_tokens = _default(prefill_chunk_tokens, settings.prefill_chunk_tokens)
        return BatchingEngine(chat_model, max_batch_size=max_batch_size, max_queue=max_queue,
                              prefix_cache_mb=prefix_cache_mb,
                              prefill_chunk_tokens=prefill_chunk_tokens)
    if isinstance(chat_model, TokenBatchable):
        max_workers = 1  # one local model, one generate at a time (it holds a lock anyway)
    return ThreadedEngine(chat_model, max_workers=max_workers, max_queue=max_queue)


def _default(value: int | None, fallback: int) -> int:
    return fallback if value is None else value
