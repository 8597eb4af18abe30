"""The bench's time to first audio, against a real server on 127.0.0.1."""

from __future__ import annotations

from types import SimpleNamespace

from helpers.bench.audio import first_audio, first_audio_table
from helpers.chat import ChatModel
from helpers.server import serve_in_background
from tests.conftest import free_port

ANSWER = ["你好呀，", "我是", "数字人。", "今天我们", "聊聊大语言模型", "和它的声音。"]


class PiecesChat(ChatModel):
    """Streams a fixed answer piece by piece, as an LLM would."""

    name = "pieces"

    def stream(self, messages, **params):
        yield from ANSWER


def test_first_audio_measures_both_ways_for_each_conversation() -> None:
    with serve_in_background(PiecesChat(), port=free_port()) as handle:
        one = first_audio(handle.url, "pieces", clients=1, tokens=16)
        three = first_audio(handle.url, "pieces", clients=3, tokens=16)
    assert one["clients"] == 1 and len(one["whole"]) == len(one["streamed"]) == 1
    assert len(three["whole"]) == len(three["streamed"]) == 3
    assert all(t > 0 for r in (one, three) for t in r["whole"] + r["streamed"])
    assert one["ratio"] == one["streamed_p50"] / one["whole_p50"]
    table = first_audio_table(SimpleNamespace(results={"ours": {"first_audio": {
        "1": one, "3": three}}, "overhead": {}}))
    assert "first audio, 1 conv." in table and "first audio, 3 conv." in table
    assert table.splitlines()[-1].startswith("| ours | ")
