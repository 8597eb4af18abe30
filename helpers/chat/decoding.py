"""Turning generated token ids into text pieces: whole UTF-8 characters, cut at stop strings."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class IncrementalDecoder:
    """Turn token ids into text pieces without ever emitting half a UTF-8 character.

    Decoding token by token breaks Chinese (one character can span several byte-level tokens, and
    a lone piece decodes to U+FFFD). We re-decode a short window and hold back text that still ends
    in U+FFFD, as vLLM and TGI do.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""


class StopMatcher:
    """Cut a text stream at the first stop string, holding back text that may start one."""

    def __init__(self, stop: Iterable[str]) -> None:
        self.stop = tuple(stop)
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Feed a piece; return the text that is safe to emit now."""
        if self.stopped:
            return ""
        if not self.stop:
            return piece
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((_overlap(self.pending, s) for s in self.stop), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        """The held-back text once the stream has ended without a stop string."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
