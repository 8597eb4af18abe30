"""``Audio``: mono 16-bit PCM and its sample rate, as WAV, raw PCM, MP3 or FLAC bytes."""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass

import numpy as np

FORMATS = ("wav", "pcm", "mp3", "flac")
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "flac": "audio/flac"}


@dataclass(frozen=True)
class Audio:
    """Mono 16-bit little-endian PCM samples at ``sample_rate`` Hz."""

    pcm: bytes
    sample_rate: int

    @property
    def samples(self) -> np.ndarray:
        """The samples as an int16 array (for plots, or ``IPython.display.Audio``)."""
        return np.frombuffer(self.pcm, dtype="<i2")

    @property
    def seconds(self) -> float:
        """How long it plays."""
        return len(self.pcm) / 2 / self.sample_rate

    def rms(self) -> float:
        """Loudness (root mean square of the samples; 0 for silence)."""
        s = self.samples.astype(np.float64)
        return float(np.sqrt(np.mean(s * s))) if s.size else 0.0

    def resample(self, rate: int) -> Audio:
        """The same sound at ``rate`` Hz (linear interpolation: enough for speech)."""
        if rate == self.sample_rate or not self.pcm:
            return Audio(self.pcm, rate)
        s = self.samples.astype(np.float64)
        n = round(len(s) * rate / self.sample_rate)
        at = np.arange(n) * (self.sample_rate / rate)
        out = np.interp(at, np.arange(len(s)), s)
        return Audio(np.clip(np.round(out), -32768, 32767).astype("<i2").tobytes(), rate)

    def wav(self) -> bytes:
        """A WAV file (the standard library writes it)."""
        out = io.BytesIO()
        with wave.open(out, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(self.sample_rate)
            w.writeframes(self.pcm)
        return out.getvalue()

    def compressed(self, format_: str) -> bytes:
        """An MP3 or FLAC file, encoded by libsndfile (its wheels bundle LAME; no ffmpeg)."""
        import soundfile

        out = io.BytesIO()
        soundfile.write(out, self.samples, self.sample_rate, format=format_.upper())
        return out.getvalue()

    def encode(self, response_format: str) -> bytes:
        """The bytes of ``response_format``: "wav", "pcm", "mp3" or "flac"."""
        if response_format == "wav":
            return self.wav()
        if response_format == "pcm":
            return self.pcm
        if response_format in ("mp3", "flac"):
            return self.compressed(response_format)
        raise ValueError(f"unknown audio format {response_format!r}: use one of {FORMATS}")

    @classmethod
    def from_mp3(cls, data: bytes) -> Audio:
        """Decode MP3 bytes (Edge TTS answers in MP3) with libsndfile."""
        import soundfile

        samples, rate = soundfile.read(io.BytesIO(data), dtype="int16", always_2d=True)
        return cls(samples.mean(axis=1).astype("<i2").tobytes(), int(rate))

    @classmethod
    def concat(cls, parts: list[Audio]) -> Audio:
        """One clip after another (all at the same sample rate)."""
        if not parts:
            raise ValueError("nothing to join")
        rates = {a.sample_rate for a in parts}
        if len(rates) != 1:
            raise ValueError(f"clips at different sample rates: {sorted(rates)}")
        return cls(b"".join(a.pcm for a in parts), parts[0].sample_rate)
