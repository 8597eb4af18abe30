"""Split an LLM answer (whole or streamed) into sentences for text-to-speech, Chinese or English.

The pieces join back to the input exactly: the spaces after a sentence stay with it, so a caller
strips each one before TTS. Standard library only, so a notebook can use it on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

# A comma or colon ends a sentence only once it has this many characters: shorter clips make TTS
# choppy (each clip has its own intonation and start-up time). About 2 s of Chinese speech.
MIN_CHARS = 10
# The first sentence may end at a comma sooner: the earlier it is complete, the earlier the
# digital human starts talking ("好的呀，" is enough; "好的，" alone is too short to sound natural).
FIRST_MIN_CHARS = 4
# No sentence is longer than this (spaces around it not counted): TTS starts late on long input and
# many models degrade past ~50-80 characters. About 12 s of Chinese speech.
MAX_CHARS = 60

STRONG = frozenset("。！？；!?;…")
WEAK = frozenset("，、：,:")
CLOSERS = frozenset("”’\"')）》」』】]")
PUNCT = STRONG | WEAK | CLOSERS | {"."}
# A full stop after these (any case) does not end a sentence: "Mr. Smith", "apples etc. and".
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc"})
# Only capitalized, so that "I said no. Then" still ends at "no.".
CAPITALIZED_ABBREVIATIONS = frozenset({"No", "Fig"})
# An initial ("J. K. Rowling"; not "I", which ends sentences) or dotted letters ("U.S.", "e.g.").
_INITIALS = re.compile(r"[A-HJ-Z]|[A-Za-z](?:\.[A-Za-z])+")


class Rule(NamedTuple):
    """One splitting rule for a notebook table; ``example`` marks each cut with "|"."""

    rule: str
    example: str


RULES = [
    Rule("强标点 。！？；!?;… 结束一句 / strong punctuation ends a sentence",
         "你好！|今天天气不错。|我们出发吧？"),
    Rule("连续标点和后面的引号、括号、空白留在句中 / runs of marks, closing quotes, brackets "
         "and spaces stay with the sentence", "真的吗？！|他说：“好的。”|走吧……"),
    Rule("换行结束一句 / a line break ends a sentence", "第一行\n|第二行\n\n|第三行"),
    Rule("英文句点后须有空白，小数、版本号不断 / an English full stop needs a space after it; "
         "numbers never split", "It costs 3.14 dollars. |Version v1.2.3 is out."),
    Rule("缩写、首字母、列表序号后不断 / no cut after abbreviations, initials, list numbers",
         "Mr. Smith met Dr. Lee at 3 p.m. today. |J. K. Rowling lives in the U.S. now."),
    Rule(f"弱标点 ，、：,: 只在句子够长时断（首句 {FIRST_MIN_CHARS} 字，其后 {MIN_CHARS} 字）/ "
         "weak punctuation cuts only a long enough sentence (shorter for the first)",
         "嗯，好的呀，|首先我们看第一个问题，|然后，再看第二个。"),
    Rule("数字中的 , : 不断；英文标点紧跟英文字符时不断 / no cut inside 3,000 10:30, "
         "nor when an ASCII mark is followed by ASCII text (URLs)",
         "共有3,000人，|会议在10:30开始。|See https://x.cn/?q=1 now! |OK."),
    Rule(f"超过 {MAX_CHARS} 字强制切开：优先弱标点，其次空白或中英文交界 / over {MAX_CHARS} "
         "characters: cut at the last weak mark, else a space or script boundary, else the cap",
         "很长的一句话没有任何标点" * 5 + "|很长的一句话没有任何标点"),
    Rule("拼接结果与输入完全相同 / the pieces join back to the input exactly",
         "Hi!  |Bye.\n"),
]


def _ascii_word(c: str) -> bool:
    return c.isascii() and not c.isspace()


class SentenceSplitter:
    """Incremental splitter: ``push()`` pieces as they stream in, ``flush()`` at the end."""

    def __init__(self, *, min_chars: int = MIN_CHARS, first_min_chars: int = FIRST_MIN_CHARS,
                 max_chars: int = MAX_CHARS) -> None:
        if max_chars < 1:
            raise ValueError("max_chars must be at least 1")
        self.min_chars, self.first_min_chars, self.max_chars = min_chars, first_min_chars, max_chars
        self._buf, self._count = "", 0
        self._reset(0)

    def _reset(self, base: int) -> None:
        # Indices into _buf: the sentence starts at _base, its text at _start; _i is the next char
        # to look at; _weak/_space/_char are where the sentence may be cut if it grows too long.
        self._base = self._i = base
        self._start: int | None = None
        self._weak: int | None = None
        self._space: int | None = None
        self._char: int | None = None

    def push(self, piece: str) -> list[str]:
        """Add a piece of text; return the sentences it completed."""
        if b := self._base:  # keep only the unfinished sentence, so memory and copies stay small
            self._buf, self._base, self._i = self._buf[b:], 0, self._i - b
            self._start, self._weak, self._space, self._char = (
                None if x is None else x - b
                for x in (self._start, self._weak, self._space, self._char))
        self._buf += piece
        return self._scan()

    def flush(self) -> list[str]:
        """Return the rest as the last sentence and reset, ready for a new text."""
        rest = self._buf[self._base:]
        self._buf, self._count = "", 0
        self._reset(0)
        return [rest] if rest else []

    def _emit(self, end: int) -> str:
        piece = self._buf[self._base:end]
        self._count += 1
        self._reset(end)
        return piece

    def _skip_space(self, k: int) -> int:
        while k < len(self._buf) and self._buf[k].isspace():
            k += 1
        return k

    def _scan(self) -> list[str]:
        out, buf, n = [], self._buf, len(self._buf)
        while self._i < n:
            i, c = self._i, buf[self._i]
            if c.isspace():
                if c == "\n" and self._start is not None:  # a line break ends a non-blank sentence
                    k = self._skip_space(i)
                    if k == n:  # more blank lines may follow
                        break
                    out.append(self._emit(k))
                    continue
                self._i += 1
                continue
            if self._start is None:
                self._start = i
            start = self._start
            if i > start and c not in PUNCT:
                if buf[i - 1].isspace():
                    self._space = i
                elif not (_ascii_word(buf[i - 1]) and _ascii_word(c)):  # not inside "abc" / "42"
                    self._char = i
            if i - start >= self.max_chars:
                out.append(self._emit(self._cut_point(i)))
                continue
            if c in PUNCT and c not in CLOSERS:
                k = self._end_at(i, c)
                if k < 0:  # the next characters decide: wait for them (or flush)
                    break
                if k:
                    out.append(self._emit(k))
                    continue
            self._i += 1
        return out

    def _end_at(self, i: int, c: str) -> int:
        """Where the sentence ends if the mark at i ends it; 0 if it does not, -1 if unknown yet."""
        buf, n, start = self._buf, len(self._buf), self._start
        assert start is not None
        r = i + 1
        if c not in WEAK:  # "?!", "……", "..." stay together; bounded so that scans stay short
            while r < n and (buf[r] in STRONG or buf[r] == ".") and r - start <= self.max_chars:
                r += 1
        j = r
        while j < n and buf[j] in CLOSERS and j - start <= self.max_chars:
            j += 1
        if j - start > self.max_chars:  # too long with its marks: the length cap decides the cut
            return 0
        k = self._skip_space(j)
        if k == n:
            return -1
        if c in WEAK:
            if i > start and buf[i - 1].isdigit() and buf[i + 1].isdigit():  # 3,000 / 10:30
                return 0
            if c.isascii() and _ascii_word(buf[j]):  # a,b / https://
                return 0
            if j - start >= (self.first_min_chars if self._count == 0 else self.min_chars):
                return k
            if buf[k] not in PUNCT:
                self._weak = k
            return 0
        run = buf[i:r]
        if not STRONG.intersection(run):  # only full stops
            if not buf[j].isspace() or (r - i == 1 and self._no_stop(i)):
                return 0
        elif run.isascii() and _ascii_word(buf[j]):  # ?q=1 / a;b
            return 0
        return k

    def _no_stop(self, i: int) -> bool:
        """Whether the full stop at i follows an abbreviation, an initial or a list number."""
        buf, w = self._buf, i
        while w > (self._start or 0) and buf[w - 1].isascii() and (
                buf[w - 1].isalnum() or buf[w - 1] == "."):
            w -= 1
        word = buf[w:i]
        return (word.lower() in ABBREVIATIONS or word in CAPITALIZED_ABBREVIATIONS
                or bool(_INITIALS.fullmatch(word)) or (word.isdigit() and w == self._start))

    def _cut_point(self, i: int) -> int:
        """Where to cut a sentence that reached max_chars at i: never before a mark."""
        if self._weak is not None and self._weak <= i:
            return self._weak
        safe = [p for p in (self._space, self._char) if p is not None]
        if safe:
            return max(safe)
        start, p = self._start or 0, i
        while p > start + 1 and self._buf[p] in PUNCT:
            p -= 1
        return i if self._buf[p] in PUNCT else p


def split_sentences(text: str, **options: int) -> list[str]:
    """Split a whole text into sentences; see ``SentenceSplitter`` for the options."""
    splitter = SentenceSplitter(**options)
    return splitter.push(text) + splitter.flush()


def stream_sentences(chunks: Iterable[str], **options: int) -> Iterator[str]:
    """Regroup streamed text pieces into sentences, each yielded as soon as it is complete."""
    splitter = SentenceSplitter(**options)
    for chunk in chunks:
        yield from splitter.push(chunk)
    yield from splitter.flush()
