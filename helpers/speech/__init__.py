"""Speech for the digital human: sentences for TTS, voices (espeak-ng offline, Edge TTS online),
and the pipeline from an LLM's stream to audio, sentence by sentence.

Imports nothing else from the package, so a notebook can use it on its own.
"""

from helpers.speech.audio import FORMATS, MEDIA_TYPES, Audio
from helpers.speech.edge import (
    DEFAULT_VOICE,
    EdgeVoice,
    SpeechUnavailable,
    edge_reachable,
    is_edge_voice,
)
from helpers.speech.espeak import EspeakVoice
from helpers.speech.pipeline import Spoken, speak_stream, speak_text
from helpers.speech.sentences import (
    ABBREVIATIONS,
    CAPITALIZED_ABBREVIATIONS,
    CLOSERS,
    FIRST_MIN_CHARS,
    MAX_CHARS,
    MIN_CHARS,
    PUNCT,
    RULES,
    STRONG,
    WEAK,
    Rule,
    SentenceSplitter,
    split_sentences,
    stream_sentences,
)
from helpers.speech.voices import BACKENDS, LANGUAGES, OPENAI_VOICES, Voice, get_voice, known_voice

__all__ = [
    "ABBREVIATIONS", "BACKENDS", "CAPITALIZED_ABBREVIATIONS", "CLOSERS", "DEFAULT_VOICE",
    "FIRST_MIN_CHARS", "FORMATS", "LANGUAGES", "MAX_CHARS", "MEDIA_TYPES", "MIN_CHARS",
    "OPENAI_VOICES", "PUNCT", "RULES", "STRONG", "WEAK", "Audio", "EdgeVoice", "EspeakVoice",
    "Rule", "SentenceSplitter", "SpeechUnavailable", "Spoken", "Voice", "edge_reachable",
    "get_voice", "is_edge_voice", "known_voice", "speak_stream", "speak_text", "split_sentences",
    "stream_sentences",
]
