"""``ThreadedEngine``: any ChatModel (cloud backends, remote-code ``model.chat``) in a thread pool."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from helpers.chat import ChatModel, GenerationParams, Message, validate_messages
from helpers.server.engine.base import Engine, EngineStoppedError, Finish, QueueFullError, Stream


class ThreadedEngine(Engine):
    """Runs ``chat_model.stream()`` in at most ``max_workers`` threads; more requests wait."""

    kind = "threaded"

    def __init__(self, chat_model: ChatModel, max_workers: int = 4, max_queue: int = 64) -> None:
        super().__init__(chat_model, max_queue)
        self.max_workers = max_workers
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Start the thread pool."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="dhllm-chat")

    def stop(self) -> None:
        """Queued requests end with EngineStoppedError; running ones finish in the background."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)  # each dropped one closes its stream

    def submit(self, messages: Sequence[Message], params: GenerationParams,
               prompt_text: str | None = None) -> Stream:
        """Queue one request (``prompt_text`` is ignored: these backends take messages)."""
        messages = validate_messages(messages)
        pool = self._pool
        if pool is None:
            raise EngineStoppedError("the engine is not running")
        with self._lock:
            if self.stats.waiting >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"{self.stats.waiting} requests are waiting; try again soon")
            self.stats.submitted += 1
            self.stats.waiting += 1
        stream = Stream()
        try:
            future = pool.submit(self._run, stream, messages, params)
        except RuntimeError as exc:  # stop() shut the pool down in between
            self._count("waiting", -1)
            raise EngineStoppedError("the engine is not running") from exc
        future.add_done_callback(lambda f: self._dropped(f, stream))
        return stream

    def _dropped(self, future: Future[None], stream: Stream) -> None:
        """A request the pool never ran (stop() cancelled it) ends with an error, not a hang."""
        if not future.cancelled():
            return
        with self._lock:
            self.stats.waiting -= 1
            self.stats.errors += 1
        stream.close(Finish("error", error=EngineStoppedError("the server is shutting down")))

    def _run(self, stream: Stream, messages: list[dict[str, str]], params: GenerationParams) -> None:
        with self._lock:
            self.stats.waiting -= 1
            self.stats.running += 1
        prompt_tokens, completion, text, reason, error = 0, 0, "", "stop", None
        try:
            prompt_tokens = self.count_tokens(" ".join(m["content"] for m in messages))
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
            completion = self.count_tokens(text)
        except BaseException as exc:  # handed to the reader, who maps it to an HTTP status
            reason, error = "error", exc
        if reason == "stop" and completion >= params.max_new_tokens:
            reason = "length"
        self._record(reason, prompt_tokens, completion)
        stream.close(Finish(reason, prompt_tokens, completion, error))

    def _record(self, reason: str, prompt_tokens: int, completion: int) -> None:
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


def _params_kwargs(params: GenerationParams) -> dict[str, Any]:
    kwargs = dict(vars(params))
    if not kwargs["stop"]:
        kwargs.pop("stop")
    return {k: v for k, v in kwargs.items() if v is not None}
