"""What counts as an English sentence in text a learner reads (issue 23).

Learners read Chinese: a message may end with English (the provider's own words, a searchable
phrase), but Chinese comes first. Names, values and code inside it are fine: backticked code,
URLs, paths, ``key=value``, command-line options and ``$VARS`` are removed before looking, and
a run of words counts as a sentence only with at least four words, two of them lower-case
(``NVIDIA GeForce RTX`` is a name, not a sentence).
"""

from __future__ import annotations

import re

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
CODE = re.compile(r"`[^`]*`|https?://\S+|\S*[/\\]\S*|[\w.\-]+=\S*|(?<!\w)--?[A-Za-z][\w-]*"
                  r"|\$\S+|\w+\([^)]*\)|\{[^}]*\}")
WORD = r"[A-Za-z][A-Za-z'’-]*"
RUN = re.compile(rf"{WORD}(?:[ ,;:]+{WORD})+")
MIN_WORDS = 4


def english_sentences(text: str) -> list[str]:
    """English runs of words in ``text`` that no Chinese comes before."""
    plain = CODE.sub(" ", text)
    found = []
    for match in RUN.finditer(plain):
        words = re.findall(WORD, match.group())
        lower = [w for w in words if w.islower() and len(w) > 1]
        if len(words) >= MIN_WORDS and len(lower) >= 2 and not CJK.search(plain[:match.start()]):
            found.append(match.group())
    return found
