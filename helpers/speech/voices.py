"""Choose a voice by backend and name: ``get_voice("auto" | "espeak" | "edge", voice)``.

Names a client may send (as in OpenAI's ``/v1/audio/speech``):
- OpenAI's voices ("alloy", ...) mean the default Chinese voice, as other OpenAI-compatible TTS
  servers do;
- "zh" / "cmn" choose Mandarin explicitly, "yue" Cantonese, "en" English;
- an Edge name ("zh-CN-XiaoxiaoNeural") chooses that Edge voice.
"""

from __future__ import annotations

from typing import Protocol

from helpers.speech.audio import Audio
from helpers.speech.edge import DEFAULT_VOICE, EdgeVoice, edge_reachable, is_edge_voice
from helpers.speech.espeak import EspeakVoice

BACKENDS = ("auto", "espeak", "edge")
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx",
                           "sage", "shimmer", "verse", "marin", "cedar"})
# Language codes -> (espeak-ng voice, Edge voice).
LANGUAGES = {"zh": ("cmn", DEFAULT_VOICE), "cmn": ("cmn", DEFAULT_VOICE),
             "yue": ("yue", "zh-HK-HiuGaaiNeural"), "en": ("en", "en-US-AriaNeural")}


class Voice(Protocol):
    """What every backend offers: text in, audio out."""

    backend: str

    def synthesize(self, text: str, speed: float = 1.0) -> Audio: ...


def known_voice(name: str) -> bool:
    """Whether ``name`` is a voice some backend understands."""
    return name in OPENAI_VOICES or name in LANGUAGES or is_edge_voice(name)


def get_voice(backend: str = "auto", voice: str = "zh") -> Voice:
    """A voice: ``backend`` "auto" takes Edge when it is reachable, else espeak-ng (offline)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown TTS backend {backend!r}: use one of {BACKENDS}")
    if not known_voice(voice):
        raise ValueError(f"unknown voice {voice!r}: use zh, cmn, yue, en, one of OpenAI's "
                         f"({', '.join(sorted(OPENAI_VOICES))}) or an Edge name like "
                         f"{DEFAULT_VOICE}")
    if backend == "auto":
        backend = "edge" if is_edge_voice(voice) or edge_reachable() else "espeak"
    espeak_name, edge_name = LANGUAGES.get(voice, ("cmn", DEFAULT_VOICE))
    if backend == "edge":
        return EdgeVoice(voice if is_edge_voice(voice) else edge_name)
    if is_edge_voice(voice):
        raise ValueError(f"{voice!r} is an Edge voice (online): use the edge backend, or "
                         "zh / cmn / yue / en for the offline espeak-ng voice")
    return EspeakVoice(espeak_name)
