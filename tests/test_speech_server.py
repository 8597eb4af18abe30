"""``POST /v1/audio/speech`` on a real server on 127.0.0.1, through the real openai SDK."""

from __future__ import annotations

import threading
import time
import wave
from collections.abc import Iterator
from io import BytesIO

import edge_tts.communicate
import openai
import pytest
import requests

import helpers.speech.edge
from helpers.chat import ChatModel
from helpers.server import ServerHandle, serve_in_background
from helpers.speech import EspeakVoice
from tests.conftest import free_port
from tests.fakes.edge_fake import EdgeFake

KEY = "sk-test-speech"


class FixedChat(ChatModel):
    """A backend that always gives the same answer (the route under test needs no model)."""

    name = "fixed"

    def stream(self, messages, **params):
        yield "你好。"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    with serve_in_background(FixedChat(), port=free_port(), api_key=KEY) as handle:
        yield handle


@pytest.fixture
def client(server: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def edge_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge_tts.communicate, "WSS_URL",
                        f"ws://127.0.0.1:{free_port()}/edge/v1?TrustedClientToken=x")
    monkeypatch.setattr(helpers.speech.edge, "_reachable", (time.monotonic(), False))


def test_wav_through_the_sdk(client: openai.OpenAI) -> None:
    reply = client.audio.speech.create(model="espeak", voice="alloy", input="你好，我是数字人。",
                                       response_format="wav")
    assert reply.response.headers["content-type"] == "audio/wav"
    with wave.open(BytesIO(reply.content)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (22050, 1, 2)
        assert 1.0 < w.getnframes() / w.getframerate() < 8.0


def test_pcm_is_24khz_as_openai_documents(client: openai.OpenAI) -> None:
    text = "今天天气很好。"
    wav = client.audio.speech.create(model="espeak", voice="zh", input=text,
                                     response_format="wav")
    pcm = client.audio.speech.create(model="espeak", voice="zh", input=text,
                                     response_format="pcm")
    assert pcm.response.headers["x-sample-rate"] == "24000"
    with wave.open(BytesIO(wav.content)) as w:
        seconds = w.getnframes() / w.getframerate()
    assert abs(len(pcm.content) / 2 / 24000 - seconds) < 0.01


def test_mp3_and_openai_model_names(client: openai.OpenAI, edge_offline: None) -> None:
    # tts-1 means auto: with Edge unreachable, the offline voice answers.
    reply = client.audio.speech.create(model="tts-1", voice="nova", input="你好", speed=1.5)
    assert reply.response.headers["content-type"] == "audio/mpeg"
    assert len(reply.content) > 500


@pytest.mark.parametrize("fields, status, words", [
    ({"input": ""}, 422, "must not be empty"),
    ({"input": "   "}, 422, "must not be empty"),
    ({"input": "字" * 4097}, 422, "at most 4096"),
    ({"voice": "klingon"}, 400, "unknown voice"),
    ({"response_format": "opus"}, 400, "unsupported response_format"),
    ({"model": "festival"}, 400, "unknown model"),
    ({"speed": 9}, 422, "speed"),
    ({"model": "espeak", "voice": "zh-CN-XiaoxiaoNeural"}, 400, "is an Edge voice"),
])
def test_bad_requests_say_what_to_fix(client: openai.OpenAI, fields: dict, status: int,
                                      words: str) -> None:
    args = {"model": "espeak", "voice": "alloy", "input": "你好", "response_format": "wav",
            **fields}
    with pytest.raises(openai.APIStatusError) as info:
        client.audio.speech.create(**args)
    assert info.value.status_code == status
    assert words in info.value.message


def test_the_api_key_applies(server: ServerHandle) -> None:
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.audio.speech.create(model="espeak", voice="alloy", input="你好")
    bare = requests.post(f"{server.url}/v1/audio/speech", timeout=10,
                         json={"model": "espeak", "voice": "alloy", "input": "你好"})
    assert bare.status_code == 401


def test_edge_through_the_fake(client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    with EdgeFake() as fake:
        monkeypatch.setattr(edge_tts.communicate, "WSS_URL", fake.url)
        reply = client.audio.speech.create(model="edge", voice="zh-CN-YunjianNeural",
                                           input="你好数字人", response_format="wav")
    assert fake.requests[0]["text"] == "你好数字人"
    assert "YunjianNeural" in fake.requests[0]["voice"]
    with wave.open(BytesIO(reply.content)) as w:
        assert w.getframerate() == 24000
        assert abs(w.getnframes() / 24000 - 0.5) < 0.06


def test_edge_unreachable_is_503_saying_why(client: openai.OpenAI, edge_offline: None) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.audio.speech.create(model="edge", voice="alloy", input="你好")
    assert info.value.status_code == 503
    assert "cannot be reached" in info.value.message and "espeak" in info.value.message


def test_synthesis_does_not_block_the_server(server: ServerHandle, client: openai.OpenAI,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """While a voice is busy speaking, /health answers (a blocked event loop never would)."""
    busy, release = threading.Event(), threading.Event()
    speak = EspeakVoice.synthesize

    def held(self: EspeakVoice, text: str, speed: float = 1.0):
        busy.set()
        release.wait(30)
        return speak(self, text, speed)

    monkeypatch.setattr(EspeakVoice, "synthesize", held)
    replies: list[bytes] = []
    thread = threading.Thread(target=lambda: replies.append(client.audio.speech.create(
        model="espeak", voice="zh", input="你好", response_format="wav").content))
    thread.start()
    try:
        assert busy.wait(10)
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    finally:
        release.set()
        thread.join(30)
    assert replies and replies[0][:4] == b"RIFF"
