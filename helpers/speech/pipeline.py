"""LLM stream -> sentences -> TTS per sentence -> audio, handed out while the LLM still writes.

A worker thread reads the text pieces, cuts sentences (``stream_sentences``) and speaks each;
the caller takes the clips from a queue as they are ready, so the first one can play while the
rest of the answer is still being generated and spoken.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from helpers.speech.audio import Audio
from helpers.speech.sentences import stream_sentences
from helpers.speech.voices import Voice

_DONE = object()


class Spoken(NamedTuple):
    """One sentence and its audio."""

    index: int
    sentence: str
    audio: Audio


def speak_stream(chunks: Iterable[str], voice: Voice, speed: float = 1.0,
                 max_ahead: int = 8) -> Iterator[Spoken]:
    """Yield each sentence's audio as soon as it is spoken; ``max_ahead`` clips may wait."""
    clips: queue.Queue = queue.Queue(maxsize=max_ahead)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():  # a consumer that left must not leave this thread blocked
            try:
                clips.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            index = 0
            for sentence in stream_sentences(chunks):
                text = sentence.strip()
                if not text:
                    continue
                if not put(Spoken(index, text, voice.synthesize(text, speed))):
                    return
                index += 1
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:  # a consumer that left early: end the LLM's stream too
                close()

    thread = threading.Thread(target=work, name="speak-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = clips.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def speak_text(text: str, voice: Voice, speed: float = 1.0) -> Audio:
    """The chapter's way: the whole answer at once, one clip."""
    return voice.synthesize(text.strip(), speed)
