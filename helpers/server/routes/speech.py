"""OpenAI's ``POST /v1/audio/speech``: text in, audio out, so the digital human can speak.

``OpenAI(base_url=..., api_key=...).audio.speech.create(model=..., voice=..., input=...)`` works:
- ``model``: "espeak" (offline stand-in voice), "edge" (Edge TTS, online), or "auto" and OpenAI's
  names ("tts-1", ...): Edge when reachable, else espeak-ng;
- ``voice``: OpenAI's names mean the default Chinese voice; "zh"/"cmn", "yue", "en" or an Edge
  name ("zh-CN-XiaoxiaoNeural") choose explicitly;
- ``response_format``: wav, pcm (24 kHz 16-bit mono, as OpenAI's), mp3 or flac.

Synthesis runs in a worker thread, so the event loop (and every other request) never waits on it.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

from helpers.server import protocol as p
from helpers.server.errors import APIError
from helpers.speech import FORMATS, MEDIA_TYPES, OPENAI_VOICES, get_voice, known_voice

router = APIRouter(prefix="/v1", tags=["audio"])

MAX_INPUT_CHARS = 4096  # OpenAI's limit for one request
PCM_RATE = 24000  # OpenAI's raw PCM is 24 kHz; clients play it at that rate
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
MODELS = {"espeak": "espeak", "edge": "edge", "auto": "auto",
          **{name: "auto" for name in OPENAI_MODELS}}
_ERRORS = {code: {"model": p.ErrorResponse} for code in (400, 401, 422, 503)}


class SpeechRequest(BaseModel):
    """OpenAI's speech request (fields it has that change nothing here are accepted, ignored)."""

    model: str = Field(description="espeak (offline), edge (online), auto, tts-1, ...")
    input: str = Field(description=f"the text to speak, at most {MAX_INPUT_CHARS} characters")
    voice: str = Field("alloy", description="alloy, ... (default Chinese voice), zh, cmn, yue, "
                                            "en, or an Edge name like zh-CN-XiaoxiaoNeural")
    response_format: str = Field("mp3", description="wav, pcm (24 kHz 16-bit mono), mp3, flac")
    speed: float = Field(1.0, ge=0.25, le=4.0)

    @field_validator("input")
    @classmethod
    def _input_fits(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty: give the text to speak")
        if len(value) > MAX_INPUT_CHARS:
            raise ValueError(f"is {len(value)} characters; at most {MAX_INPUT_CHARS}: split it "
                             "into sentences (helpers.speech.split_sentences)")
        return value


def _check(body: SpeechRequest) -> None:
    """Name the field to fix, before any work is done."""
    if body.model not in MODELS:
        raise APIError(400, f"unknown model {body.model!r}: use espeak (offline), edge (online) "
                            f"or auto ({', '.join(OPENAI_MODELS)} mean auto)", "model")
    if body.response_format not in FORMATS:
        raise APIError(400, f"unsupported response_format {body.response_format!r}: use one "
                            f"of {', '.join(FORMATS)}", "response_format")
    if not known_voice(body.voice):
        raise APIError(400, f"unknown voice {body.voice!r}: use zh, cmn, yue, en, an Edge name "
                            f"like zh-CN-XiaoxiaoNeural, or one of OpenAI's "
                            f"({', '.join(sorted(OPENAI_VOICES))})", "voice")


def _synthesize(body: SpeechRequest) -> tuple[bytes, int]:
    """Pick the voice, speak, encode (blocking: runs in a worker thread)."""
    try:
        voice = get_voice(MODELS[body.model], body.voice)
    except ValueError as exc:
        raise APIError(400, str(exc), "voice") from exc
    audio = voice.synthesize(body.input.strip(), body.speed)
    if body.response_format == "pcm":
        audio = audio.resample(PCM_RATE)
    return audio.encode(body.response_format), audio.sample_rate


@router.post("/audio/speech", response_class=Response, responses={
    200: {"content": {t: {} for t in MEDIA_TYPES.values()}}, **_ERRORS})
async def speech(body: SpeechRequest) -> Response:
    """Speak ``input``; an unreachable Edge service answers 503 and says why."""
    _check(body)
    data, rate = await run_in_threadpool(_synthesize, body)
    return Response(data, media_type=MEDIA_TYPES[body.response_format],
                    headers={"X-Sample-Rate": str(rate)})
