"""A request inside the batching engine: its ids, sampling state, decoder and stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field

from helpers.chat import GenerationParams, IncrementalDecoder, StopMatcher, TokenBatchable
from helpers.server.engine.base import Stream


@dataclass
class Row:
    """One request inside the running batch (or its prefill group)."""

    stream: Stream
    prompt_ids: list[int]
    params: GenerationParams
    decoder: IncrementalDecoder
    stopper: StopMatcher
    slot: int | None = None  # its place in the runner's BatchSampler while it lives
    tokens: list[int] = field(default_factory=list)  # generated ids (the prefix cache keeps them)
    cached: int = 0  # prompt tokens whose KV came from the prefix cache
    position: int = 0  # position id of the next input token = tokens in this row's KV
    next_token: int = 0
    fresh: bool = False  # next_token is picked but not yet emitted
    finish_reason: str | None = None
    closed: bool = False  # its stream has its Finish: a row is finished exactly once

    @classmethod
    def new(cls, stream: Stream, ids: list[int], params: GenerationParams,
            model: TokenBatchable) -> Row:
        """A row about to be prefilled: its own decoder and stop matcher."""
        return cls(stream=stream, prompt_ids=ids, params=params,
                   decoder=IncrementalDecoder(model.tokenizer),
                   stopper=StopMatcher(params.stop + model.default_stop), position=len(ids))

    def emit(self, eos: set[int]) -> None:
        """Send the row's fresh token as text, or decide why it ends."""
        if self.stream.cancelled.is_set():
            self.finish_reason = "cancelled"
        elif not self.fresh:
            return
        elif self.next_token in eos:
            self.fresh = False
            self.finish_reason = "stop"
            self._flush()  # text held back as a possible start of a stop string is reply text
        else:
            self.fresh = False
            piece = self.stopper.push(self.decoder.push(self.next_token))
            if piece:
                self.stream.put_text(piece)
            if self.stopper.stopped:
                self.finish_reason = "stop"
            elif len(self.tokens) >= self.params.max_new_tokens:
                self.finish_reason = "length"
                self._flush()

    def _flush(self) -> None:
        tail = self.stopper.flush()
        if tail:
            self.stream.put_text(tail)
