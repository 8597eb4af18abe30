"""An offline voice: espeak-ng, from the ``espeakng-loader`` wheel (library and Mandarin data).

Robotic: a stand-in voice that works anywhere without internet or a GPU. No Python binding on
PyPI ships the library with its data for Linux, macOS and Windows, so this calls its C API
through ctypes (about 30 lines).
"""

from __future__ import annotations

import ctypes
import threading

from helpers.speech.audio import Audio

AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
ESPEAK_RATE = 1  # espeak_PARAMETER: words per minute
DEFAULT_RATE = 175
VOICES = {"cmn": "cmn", "zh": "cmn", "yue": "yue", "en": "en"}

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class _Engine:
    """The loaded library. espeak-ng keeps global state, so one lock guards every call."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                               ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                          ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                          ctypes.c_void_p, ctypes.c_void_p]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        data = espeakng_loader.get_data_path().encode()
        self.sample_rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak-ng did not start (data in {data.decode()})")
        self.lock = threading.Lock()
        self._chunks: list[bytes] = []
        self._callback = _CALLBACK(self._collect)  # kept alive as long as the library uses it
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes.Array, count: int, events: int) -> int:
        if count > 0:
            self._chunks.append(ctypes.string_at(wav, count * 2))
        return 0  # 0 = go on

    def synthesize(self, text: str, voice: str, rate: int) -> Audio:
        data = text.encode("utf-8")
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self.lib.espeak_SetParameter(ESPEAK_RATE, rate, 0)
            self._chunks = []
            self.lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8,
                                  None, None)
            pcm = b"".join(self._chunks)
        return Audio(pcm, self.sample_rate)


_engine: _Engine | None = None
_engine_lock = threading.Lock()


def _get_engine() -> _Engine:
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _Engine()
        return _engine


class EspeakVoice:
    """espeak-ng's robotic voice (a stand-in); ``voice`` "cmn" (Mandarin), "yue" or "en"."""

    backend = "espeak"

    def __init__(self, voice: str = "cmn") -> None:
        if voice not in VOICES:
            raise ValueError(f"unknown espeak voice {voice!r}: use one of {sorted(VOICES)}")
        self.voice = VOICES[voice]

    def synthesize(self, text: str, speed: float = 1.0) -> Audio:
        """Speak ``text`` (``speed`` 0.25-4: 1 = espeak's normal rate); milliseconds on a CPU."""
        rate = round(min(max(DEFAULT_RATE * speed, 80), 450))  # espeak-ng accepts 80-450 wpm
        return _get_engine().synthesize(text, self.voice, rate)

    def __repr__(self) -> str:
        return f"EspeakVoice({self.voice!r})"
