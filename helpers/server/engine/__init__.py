"""The serving engine: generation runs in worker threads, never on the event loop.

Two engines share one interface (``submit`` -> ``Stream``):

- ``BatchingEngine`` for a local model with the ``TokenBatchable`` capability: one worker
  thread runs a continuous-batching decode loop with prefix (KV) reuse and chunked prefill,
  composed of a ``Scheduler`` (what each step runs), a ``KVManager`` (every KV tensor and the
  prefix cache) and a ``ModelRunner`` (forward passes and sampling).
- ``ThreadedEngine`` for any other ChatModel (cloud backends, remote-code ``model.chat``): each
  request's ``stream()`` runs in a bounded thread pool.
"""

from __future__ import annotations

from typing import Any

from helpers.chat import ChatModel, TokenBatchable
from helpers.config import Settings, get_settings
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


def create_engine(chat_model: ChatModel, settings: Settings | None = None, max_workers: int = 4,
                  **overrides: Any) -> Engine:
    """The batching engine for a local model that can batch, the threaded one otherwise.

    Limits come from ``settings`` (default: ``get_settings()``, i.e. the ``DHLLM_*``
    environment); ``overrides`` replace single fields (``max_batch_size=8``).
    """
    if isinstance(chat_model, TokenBatchable) and chat_model.can_batch:
        return BatchingEngine(chat_model, settings, **overrides)
    settings = (settings or get_settings()).model_copy(update=overrides)
    if isinstance(chat_model, TokenBatchable):
        max_workers = 1  # one local model, one generate at a time (it holds a lock anyway)
    return ThreadedEngine(chat_model, max_workers=max_workers, max_queue=settings.max_queue)
