"""helpers.speech voices and pipeline: espeak-ng for real, Edge TTS against a local fake."""

from __future__ import annotations

import threading
import time
import wave
from collections.abc import Iterator
from io import BytesIO

import edge_tts.communicate
import pytest

import helpers.speech.edge
from helpers.speech import (
    Audio,
    EdgeVoice,
    EspeakVoice,
    SpeechUnavailable,
    get_voice,
    speak_stream,
    speak_text,
)
from tests.conftest import free_port
from tests.fakes.edge_fake import EdgeFake


@pytest.fixture
def edge_fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[EdgeFake]:
    """edge-tts pointed at the local fake (its URL is a module constant, nothing else changes)."""
    with EdgeFake() as fake:
        monkeypatch.setattr(edge_tts.communicate, "WSS_URL", fake.url)
        yield fake


@pytest.fixture
def edge_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Edge's address points at a closed local port, and the reachability probe says no."""
    monkeypatch.setattr(edge_tts.communicate, "WSS_URL",
                        f"ws://127.0.0.1:{free_port()}/edge/v1?TrustedClientToken=x")
    monkeypatch.setattr(helpers.speech.edge, "_reachable", (time.monotonic(), False))


@pytest.mark.parametrize("text, min_s, max_s", [
    ("你好，我是数字人助手，很高兴为你服务。", 2.0, 10.0),  # 18 characters of Chinese
    ("Hello, I am your digital assistant.", 1.0, 6.0),
    ("12345 67890", 1.0, 8.0),
])
def test_the_offline_voice_speaks(text: str, min_s: float, max_s: float) -> None:
    audio = EspeakVoice("cmn").synthesize(text)
    assert audio.sample_rate == 22050
    assert min_s <= audio.seconds <= max_s, audio.seconds
    assert audio.rms() > 500  # not silence (int16 full scale is 32767)


def test_speed_shortens_the_audio() -> None:
    voice = EspeakVoice()
    normal, fast = voice.synthesize("今天天气很好。"), voice.synthesize("今天天气很好。", speed=2)
    assert fast.seconds < 0.75 * normal.seconds


def test_the_offline_voice_is_thread_safe() -> None:
    voice, results = EspeakVoice(), {}

    def speak(i: int) -> None:
        results[i] = voice.synthesize("第" + "一二三四五六"[i] + "句话。").seconds

    threads = [threading.Thread(target=speak, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(0.5 < s < 5 for s in results.values())


def test_audio_formats_round_trip() -> None:
    audio = EspeakVoice().synthesize("你好")
    with wave.open(BytesIO(audio.encode("wav"))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (22050, 1, 2)
        assert w.readframes(w.getnframes()) == audio.pcm
    assert audio.encode("pcm") == audio.pcm
    back = Audio.from_mp3(audio.encode("mp3"))
    assert back.sample_rate == 22050 and abs(back.seconds - audio.seconds) < 0.2
    resampled = audio.resample(24000)
    assert abs(resampled.seconds - audio.seconds) < 0.01 and resampled.rms() > 500
    with pytest.raises(ValueError, match="unknown audio format"):
        audio.encode("ogg")


def test_get_voice_chooses_by_backend_and_name(edge_offline: None) -> None:
    assert isinstance(get_voice("espeak", "alloy"), EspeakVoice)
    assert get_voice("espeak", "en").voice == "en"
    assert get_voice("edge", "zh").voice == "zh-CN-XiaoxiaoNeural"
    assert get_voice("edge", "zh-CN-YunxiNeural").voice == "zh-CN-YunxiNeural"
    assert isinstance(get_voice("auto", "nova"), EspeakVoice)  # Edge unreachable: offline voice
    with pytest.raises(ValueError, match="unknown voice"):
        get_voice("espeak", "klingon")
    with pytest.raises(ValueError, match="unknown TTS backend"):
        get_voice("festival", "zh")
    with pytest.raises(ValueError, match="is an Edge voice"):
        get_voice("espeak", "zh-CN-XiaoxiaoNeural")


def test_edge_voice_against_the_fake(edge_fake: EdgeFake) -> None:
    audio = EdgeVoice("zh-CN-YunxiNeural").synthesize("你好世界")
    assert edge_fake.requests == [{"voice": "Microsoft Server Speech Text to Speech Voice "
                                            "(zh-CN, YunxiNeural)", "text": "你好世界"}]
    assert audio.sample_rate == 24000 and abs(audio.seconds - 0.4) < 0.06
    assert audio.rms() > 1000


def test_edge_unreachable_says_why(edge_offline: None) -> None:
    with pytest.raises(SpeechUnavailable, match="cannot be reached") as info:
        EdgeVoice().synthesize("你好")
    assert info.value.status_code == 503


def test_the_pipeline_speaks_before_the_llm_finishes() -> None:
    """Order of events: the first audio must come out while the LLM still holds its answer."""
    events: list[str] = []
    first_audio = threading.Event()

    def llm() -> Iterator[str]:
        for piece in ["你好呀，", "我是", "数字人。"]:
            events.append("llm piece")
            yield piece
        # A pipeline that waits for the whole answer never sets this: then "llm done" comes first.
        first_audio.wait(timeout=20)
        for piece in ["今天", "我们聊聊", "大语言模型。"]:
            yield piece
        events.append("llm done")

    spoken = []
    for clip in speak_stream(llm(), EspeakVoice()):
        events.append(f"audio {clip.index}")
        first_audio.set()
        spoken.append(clip)
    assert events.index("audio 0") < events.index("llm done"), events
    assert [c.sentence for c in spoken] == ["你好呀，", "我是数字人。", "今天我们聊聊大语言模型。"]
    assert all(c.audio.rms() > 500 for c in spoken)


def test_the_pipeline_hands_on_errors_and_the_chapter_way_speaks_all() -> None:
    def broken() -> Iterator[str]:
        yield "第一句话说完了。"
        raise ConnectionError("the LLM server went away")

    with pytest.raises(ConnectionError, match="went away"):
        list(speak_stream(broken(), EspeakVoice()))
    whole = speak_text("第一句。第二句。", EspeakVoice())
    assert whole.seconds > EspeakVoice().synthesize("第一句。").seconds


def test_leaving_the_pipeline_early_closes_the_llm_stream() -> None:
    closed = threading.Event()

    def llm() -> Iterator[str]:
        try:
            while True:
                yield "又一句话。"
        finally:
            closed.set()

    stream = llm()  # the caller still holds it, so only the pipeline can close it
    clips = speak_stream(stream, EspeakVoice(), max_ahead=1)
    assert next(clips).sentence == "又一句话。"
    clips.close()
    assert closed.wait(10)


def test_offline_auto_is_espeak_without_probing_the_network(monkeypatch) -> None:
    """DHLLM_OFFLINE=1: "auto" picks the offline voice and never opens a connection to Edge."""
    import socket

    from helpers.speech import edge
    from helpers.speech.voices import get_voice

    def no_network(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError(f"probed the network offline: {args}")

    monkeypatch.setenv("DHLLM_OFFLINE", "1")
    monkeypatch.setattr(edge, "_reachable", None)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert edge.edge_reachable() is False
    assert get_voice("auto", "zh").backend == "espeak"
