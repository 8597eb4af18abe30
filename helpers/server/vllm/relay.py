"""vLLM behind dhllm: the same ``Engine`` contract, generation done by a vLLM server on loopback.

dhllm keeps what it promises (the chapter's ``POST /`` with history and the Linly template, the
OpenAI ``/v1`` with SSE, API key, error shapes, 503 when the engine is down) and relays each
request to vLLM's OpenAI-compatible API. The relay runs on the event loop (no threads): one
streamed httpx request per request, whose closing makes vLLM abort the request (measured: its
running count drops within ~0.1 s), so a client that hangs up stops the generation upstream too.

Chat-template models go to vLLM's ``/v1/chat/completions`` (vLLM applies the template);
Linly-template models and verbatim Linly-Talker prompts go to ``/v1/completions`` with the
rendered prompt and the template's stop strings, since Linly-7B has no chat template.

Behind vllm-router (``retries`` > 0) a request whose replica fails is sent again, and the router
picks another replica, as long as nothing of it reached the client: a reply the client gets
whole (``Stream.buffered``: the chapter's ``POST /``, a non-streamed ``/v1``) is collected here
and retried from scratch; a stream is retried from scratch before its first token, and after
it is *continued*: the prompt's token ids plus the ids already delivered go to another replica
as a ``/v1/completions`` prompt, for the tokens still allowed, so the client sees one answer
with a pause (greedy: the same tokens an undisturbed run gives; ``return_token_ids``, vLLM >=
0.10.2, gives us the ids). A stream that cannot be continued ends with an error event: its text
cannot be taken back. Every failure of vLLM's is one here, never a short answer: a stream that
stops before ``[DONE]`` (its replica died), an ``{"error": ...}`` event (vLLM ends a failed
stream with one, then ``[DONE]``) and ``finish_reason: "abort"``. A request cut by ``stop()``
(the server is stopping) ends with a 503, never an empty 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from helpers.chat.base import GenerationParams, Message, validate_messages
from helpers.chat.prompts import LINLY_STOP, render_linly_prompt
from helpers.server.engine import Engine, EngineStoppedError, Finish, QueueFullError, Stream

log = logging.getLogger("dhllm.server.vllm")
CANCEL_POLL_S = 0.05  # how often a relay checks whether its client went away
# The router takes a dead replica out at its next health check (2 s), our supervisor within
# ~1 s: waiting 0.5 s, then 1 s, lands on a live one.
RETRY_WAITS_S = (0.5, 1.0, 2.0, 4.0)


class VLLMEngine(Engine):
    """Relays requests to a running vLLM server (or vllm-router); ``process`` (a VLLMProcess or a
    ReplicaSet, if given) is stopped with it; ``retries``: attempts after a failed one."""

    kind = "vllm"

    def __init__(self, chat_model: Any, base_url: str, served_name: str,
                 prompt_format: str | None = None, max_queue: int = 64, max_running: int = 256,
                 process: Any = None, timeout: float = 600.0, retries: int = 0) -> None:
        super().__init__(chat_model, max_queue)
        self.base_url = base_url.rstrip("/")
        self.served_name = served_name
        self.prompt_format = prompt_format
        self.max_in_flight = max_running + max_queue  # vLLM queues itself; this bounds memory
        self.process = process
        self.timeout = timeout
        self.retries = retries
        self.retried = 0  # attempts made again after a failure (all requests)
        self.continued = 0  # streams continued on another replica after a failure mid-way
        self._client: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = True
        self._stopping: threading.Thread | None = None  # stopping the processes (see stop)

    def start(self) -> None:
        self._stopped = False
        self._stopping = None

    def stop(self) -> None:
        """End every open request (503, or an error event in a stream), then stop our vLLM.

        Called on the app's loop (before uvicorn waits for open requests, then again from the
        lifespan), the processes stop in a thread: stopping a router and replicas takes seconds,
        and a loop blocked that long sent the cancelled streams' error events too late, after
        the SSE shutdown grace (4 of 8 streams silently cut on SIGTERM, fault bench
        2026-12-07). The second call waits for that thread."""
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        client, self._client = self._client, None
        if client is not None:
            # Called from the app's shutdown, on its loop: close the connection pool there.
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(client.aclose())
        if self.process is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not on a loop: nothing waits to be delivered
            self.process.stop()
            return
        if self._stopping is None:  # not a daemon: the interpreter waits for it at exit
            self._stopping = threading.Thread(target=self.process.stop, name="vllm-stop")
            self._stopping.start()
        else:
            self._stopping.join()

    def replica_health(self) -> dict[str, Any] | None:
        """Replicas in all and healthy (behind a router we started), for ``/health``."""
        health = getattr(self.process, "health", None)
        if health is None:
            return None
        return {**health(), "retried": self.retried, "continued": self.continued}

    def submit(self, messages: Sequence[Message], params: GenerationParams,
               prompt_text: str | None = None) -> Stream:
        """Start relaying one request; call from the server's event loop."""
        messages = validate_messages(messages)
        if self._stopped:
            raise EngineStoppedError("the engine is not running")
        with self._lock:
            if len(self._tasks) >= self.max_in_flight:
                self.stats.rejected += 1
                raise QueueFullError(f"{len(self._tasks)} requests are in flight; try again soon")
            self.stats.submitted += 1
            self.stats.running += 1
        stream = Stream()
        task = asyncio.get_running_loop().create_task(
            self._relay(stream, messages, params, prompt_text))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stream

    def _http(self) -> Any:
        import httpx

        if self._client is None:
            # Plain httpx and json, not the openai SDK: this loop runs once per token of every
            # stream, and building the SDK's pydantic chunks cost a third of vLLM's throughput
            # at 8 clients here. No retries: a retried generation would repeat tokens.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            self._client = httpx.AsyncClient(base_url=self.base_url, limits=limits,
                                             timeout=httpx.Timeout(self.timeout, connect=10))
        return self._client

    def _request(self, messages: list[dict[str, str]], params: GenerationParams,
                 prompt_text: str | None) -> tuple[str, dict[str, Any]]:
        """Which vLLM endpoint, and the body for it."""
        body: dict[str, Any] = {
            "model": self.served_name, "stream": True, "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p,
            "stream_options": {"include_usage": True},
        }
        extra: dict[str, Any] = {"repetition_penalty": params.repetition_penalty}
        if params.top_k:
            extra["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        stop = list(params.stop)
        if prompt_text is not None or self.prompt_format == "linly":
            body["prompt"] = prompt_text or render_linly_prompt(messages)
            stop += [s for s in LINLY_STOP if s not in stop]
            endpoint = "/completions"
        else:
            body["messages"] = messages
            endpoint = "/chat/completions"
        if stop:
            body["stop"] = stop
        body.update(extra)  # vLLM's sampling extensions of the OpenAI protocol
        return endpoint, body

    async def _relay(self, stream: Stream, messages: list[dict[str, str]],
                     params: GenerationParams, prompt_text: str | None) -> None:
        """Copy vLLM's stream into ``stream``; stop upstream when the reader goes away."""
        finish = Finish("stop")
        relay = asyncio.current_task()
        watcher = asyncio.create_task(self._cancel_when_abandoned(stream, relay))
        try:
            finish = await self._copy_retrying(stream, *self._request(messages, params,
                                                                      prompt_text))
        except asyncio.CancelledError:
            # The reader went away, or stop() cut it: a server that stops answers 503.
            finish = Finish("cancelled") if stream.cancelled.is_set() else Finish(
                "error", error=EngineStoppedError("the server is stopping; send the request "
                                                  "again in a moment"))
        except Exception as exc:  # handed to the reader, who maps it to an HTTP status
            finish = Finish("error", error=upstream_error(exc))
        finally:
            watcher.cancel()
        self._count_finish(finish)
        stream.close(finish)

    async def _copy_retrying(self, stream: Stream, endpoint: str, body: dict[str, Any]) -> Finish:
        """``_copy``, again after a replica failure: from scratch while no client has seen any
        of it, continued from the delivered token ids after (see the module doc)."""
        sent = _Sent()
        if self.retries and not stream.buffered:
            body = {**body, "return_token_ids": True}  # what a continuation needs
        asked = body  # the client's request: every continuation counts its tokens from it
        for attempt in range(self.retries + 1):
            pieces: list[str] = []

            def deliver(piece: str, pieces: list[str] = pieces) -> None:
                if stream.buffered:  # the client gets it whole: hold it until the end
                    pieces.append(piece)
                else:
                    sent.text = True
                    stream.put_text(piece)

            try:
                finish = await self._copy(deliver, endpoint, body, sent)
            except Exception as exc:
                if (attempt == self.retries or stream.cancelled.is_set()
                        or not _replica_failure(exc)):
                    raise
                if sent.text:
                    continued = sent.continuation(asked)
                    if continued is None:
                        raise  # no token ids to go on from: the text cannot be taken back
                    endpoint, body = "/completions", continued
                    self.continued += 1
                    log.warning("vLLM replica failed mid-stream (%s); continuing after %d "
                                "tokens on another", exc, len(sent.token_ids))
                self.retried += 1
                await asyncio.sleep(RETRY_WAITS_S[min(attempt, len(RETRY_WAITS_S) - 1)])
                continue
            if pieces:
                stream.put_text("".join(pieces))
            if sent.continued and sent.prompt_ids is not None:
                # A continued answer: count it as one request (its prompt, all its tokens).
                finish.prompt_tokens = len(sent.prompt_ids)
                finish.completion_tokens = len(sent.token_ids)
            return finish
        raise AssertionError("unreachable")

    async def _copy(self, deliver: Callable[[str], None], endpoint: str,
                    body: dict[str, Any], sent: _Sent | None = None) -> Finish:
        finish = Finish("stop")
        done = False
        # Leaving the block closes the response: vLLM notices and aborts the request.
        async with self._http().stream("POST", endpoint, json=body) as response:
            if response.status_code >= 400:
                raise UpstreamStatusError(response.status_code, (await response.aread()).decode(
                    errors="replace"))
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                if not line.startswith("data:") or done:
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("error"):  # vLLM's way to end a stream that failed mid-way
                    raise UpstreamErrorEvent(chunk["error"])
                if sent is not None:
                    sent.prompt(chunk.get("prompt_token_ids"))
                for choice in chunk.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content") or choice.get("text")
                    if sent is not None:
                        sent.prompt(choice.get("prompt_token_ids"))
                        sent.token_ids.extend(choice.get("token_ids") or ())
                    if piece:
                        deliver(piece)
                    reason = choice.get("finish_reason")
                    if reason == "abort":  # vLLM aborted it (engine stopping, or failing)
                        raise UpstreamErrorEvent({"message": "vLLM aborted the request"})
                    if reason:
                        finish.reason = "length" if reason == "length" else "stop"
                usage = chunk.get("usage")
                if usage:
                    finish.prompt_tokens = usage.get("prompt_tokens", 0)
                    finish.completion_tokens = usage.get("completion_tokens", 0)
                    finish.cached_tokens = (usage.get("prompt_tokens_details") or {}).get(
                        "cached_tokens") or 0
        if not done:
            raise BrokenStreamError("vLLM's stream ended before [DONE]")
        return finish

    @staticmethod
    async def _cancel_when_abandoned(stream: Stream, relay: asyncio.Task[Any] | None) -> None:
        """Cancel ``relay`` once the stream's reader has gone (``Stream.cancel`` is thread-safe,
        an Event, so it is polled rather than awaited)."""
        while not stream.cancelled.is_set():
            await asyncio.sleep(CANCEL_POLL_S)
        if relay is not None:
            relay.cancel()

    def _count_finish(self, finish: Finish) -> None:
        with self._lock:
            self.stats.running -= 1
            self.stats.prompt_tokens += finish.prompt_tokens
            self.stats.completion_tokens += finish.completion_tokens
            counter = {"cancelled": "cancelled", "error": "errors"}.get(finish.reason, "completed")
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)


class _Sent:
    """What of one request reached the client: whether any text, and its token ids (with the
    prompt's), from which another replica can go on."""

    def __init__(self) -> None:
        self.text = False
        self.prompt_ids: list[int] | None = None  # the first attempt's prompt, as vLLM saw it
        self.continued = False
        self.token_ids: list[int] = []  # every token delivered so far, all attempts

    def prompt(self, ids: list[int] | None) -> None:
        if ids and self.prompt_ids is None:
            self.prompt_ids = list(ids)

    def continuation(self, asked: dict[str, Any]) -> dict[str, Any] | None:
        """The body that goes on from here: prompt and delivered ids, the tokens left of what
        the client ``asked`` for (its own body, never an earlier continuation's)."""
        if self.prompt_ids is None:
            return None
        left = asked["max_tokens"] - len(self.token_ids) if asked.get("max_tokens") else None
        if left is not None and left <= 0:
            return None
        self.continued = True
        original = {k: v for k, v in asked.items() if k not in ("messages", "prompt")}
        continued = {**original, "prompt": self.prompt_ids + self.token_ids,
                     "return_token_ids": True}
        if left is not None:
            continued["max_tokens"] = left
        return continued


def _replica_failure(exc: BaseException) -> bool:
    """A failure another replica may not have: down, cut off, or a 5xx (not our bad request)."""
    import httpx

    if isinstance(exc, UpstreamStatusError):
        return exc.status >= 500
    return isinstance(exc, httpx.TransportError | BrokenStreamError | UpstreamErrorEvent)


class BrokenStreamError(Exception):
    """vLLM's stream ended without ``[DONE]``: the replica died or the connection was cut."""


class UpstreamErrorEvent(Exception):
    """vLLM's stream carried an ``{"error": ...}`` event or ``finish_reason: "abort"``."""

    def __init__(self, error: Any) -> None:
        message = error.get("message") if isinstance(error, dict) else str(error)
        super().__init__(f"vLLM failed in the middle of the answer: {message}")
        self.message = str(message)[:500]


class UpstreamStatusError(Exception):
    """vLLM answered with an HTTP error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"vLLM answered {status}")
        self.status = status
        try:
            self.message = json.loads(body).get("error", {}).get("message") or body[:500]
        except (ValueError, AttributeError):
            self.message = body[:500]


def upstream_error(exc: BaseException) -> BaseException:
    """vLLM's failures as errors the server maps: 503 when it is down, its 4xx as 400."""
    import httpx

    from helpers.errors import BadRequestError, UnavailableError

    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return UnavailableError("vLLM is not answering (did it stop or crash? see its log)")
    if isinstance(exc, httpx.TransportError | BrokenStreamError):  # cut off while answering
        return UnavailableError("vLLM stopped in the middle of the answer (did a replica crash? "
                                "see its log); send the request again")
    if isinstance(exc, UpstreamErrorEvent):
        return UnavailableError("vLLM failed in the middle of the answer (see its log); send "
                                "the request again", provider_message=exc.message)
    if isinstance(exc, UpstreamStatusError):
        if 400 <= exc.status < 500:
            return BadRequestError(f"vLLM refused the request: {exc.message}",
                                   provider_message=exc.message)
        return UnavailableError(f"vLLM answered {exc.status}", provider_message=exc.message)
    return exc
