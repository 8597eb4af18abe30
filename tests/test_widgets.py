"""The chat widget's logic, driven the way its buttons drive it: send, stream, follow up, clear."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from helpers.widgets import ChatBox, describe_error


class FakeStream:
    """Records the messages of each call and streams a canned answer piece by piece."""

    def __init__(self, answers: Sequence[Sequence[str]] = (("Hel", "lo", "!"),)) -> None:
        self.answers = list(answers)
        self.calls: list[list[dict[str, str]]] = []
        self.gate: threading.Event | None = None

    def __call__(self, messages: Sequence[dict[str, str]]) -> Iterator[str]:
        self.calls.append([dict(m) for m in messages])
        pieces = self.answers[min(len(self.calls), len(self.answers)) - 1]
        for piece in pieces:
            if self.gate is not None:
                self.gate.wait(5)
            yield piece


def test_send_streams_answer_into_history_and_display() -> None:
    stream = FakeStream()
    box = ChatBox(stream)
    box.input.value = "  你好  "
    thread = box.ask()
    assert thread is not None
    box.wait(5)
    assert stream.calls == [[{"role": "user", "content": "你好"}]]
    assert box.history == [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert box.transcript == [("user", "你好"), ("assistant", "Hello!")]
    assert box.input.value == ""
    assert "Hello!" in box.conversation.value and "你好" in box.conversation.value
    assert not box.send_button.disabled
    assert "1 轮对话" in box.status.value


def test_follow_up_sees_earlier_turns_and_system_prompt() -> None:
    stream = FakeStream([["A1"], ["A2"]])
    box = ChatBox(stream, system="简短回答")
    box.ask("Q1")
    box.wait(5)
    box.ask("Q2")
    box.wait(5)
    assert stream.calls[1] == [
        {"role": "system", "content": "简短回答"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert [m["content"] for m in box.history] == ["Q1", "A1", "Q2", "A2"]


def test_answer_grows_while_streaming_and_buttons_wait() -> None:
    stream = FakeStream([["one ", "two ", "three"]])
    stream.gate = threading.Event()
    box = ChatBox(stream)
    box.ask("count")
    assert box.busy and box.send_button.disabled and box.clear_button.disabled
    assert box.ask("ignored while busy") is None
    box.clear()  # ignored while busy
    assert box.transcript[0] == ("user", "count")
    stream.gate.set()
    box.wait(5)
    assert box.transcript[-1] == ("assistant", "one two three")
    assert len(stream.calls) == 1


def test_clear_forgets_history_and_display() -> None:
    box = ChatBox(FakeStream())
    box.ask("hi")
    box.wait(5)
    box.clear()
    assert box.history == [] and box.transcript == []
    assert "还没有对话" in box.conversation.value


def test_empty_input_sends_nothing() -> None:
    stream = FakeStream()
    box = ChatBox(stream)
    box.input.value = "   "
    assert box.ask() is None
    assert stream.calls == []


def wait_for_answer(box: ChatBox, turns: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while sum(m["role"] == "assistant" for m in box.history) < turns:
        assert time.monotonic() < deadline, box.transcript
        time.sleep(0.01)


def test_enter_in_the_text_box_sends() -> None:
    box = ChatBox(FakeStream())
    box.input.value = "hi"
    box._on_input_msg(box.input, {"event": "submit"}, [])
    wait_for_answer(box, 1)
    assert box.transcript == [("user", "hi"), ("assistant", "Hello!")]


def test_click_reads_keystrokes_that_arrive_just_after_it() -> None:
    box = ChatBox(FakeStream())
    box.input.value = "What is the cap"
    box.send_button.click()  # what the button's "click" message does
    box.input.value = "What is the capital?"  # the browser's throttled last value update
    wait_for_answer(box, 1)
    assert box.history[0] == {"role": "user", "content": "What is the capital?"}


def test_status_counts_turns_and_clear_resets_it() -> None:
    box = ChatBox(FakeStream([["A1"], ["A2"]]))
    box.ask("Q1")
    box.wait(5)
    box.ask("Q2")
    box.wait(5)
    assert "2 轮对话" in box.status.value
    box.clear()
    assert "0 轮对话" in box.status.value


def test_user_text_is_escaped() -> None:
    box = ChatBox(FakeStream([["<b>x</b>"]]))
    box.ask("<script>alert(1)</script>")
    box.wait(5)
    assert "<script>" not in box.conversation.value
    assert "&lt;script&gt;" in box.conversation.value and "&lt;b&gt;x&lt;/b&gt;" in box.conversation.value


def test_error_is_shown_readably_and_question_dropped_from_history() -> None:
    def broken(messages: Sequence[dict[str, str]]) -> Iterator[str]:
        raise ConnectionRefusedError("[Errno 111] Connection refused")
        yield ""

    box = ChatBox(broken, url="http://127.0.0.1:9")
    box.ask("hi")
    box.wait(5)
    assert box.history == []
    kind, text = box.transcript[-1]
    assert kind == "error"
    assert "http://127.0.0.1:9" in text and "Traceback" not in text
    assert "dhllm-msg-error" in box.conversation.value
    assert not box.send_button.disabled


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError("refused"), "连不上服务器"),
        (TimeoutError("read timed out"), "太久没有回应"),
        (ValueError("temperature must be >= 0"), "ValueError: temperature must be >= 0"),
    ],
)
def test_describe_error(exc: Exception, expected: str) -> None:
    assert expected in describe_error(exc)


# ---------------------------------------------------------------------------------------------
# Against the real API server (tiny random model): HTTP streaming, history, keys, a dead server.


@pytest.fixture
def tiny_server(tiny_chat, port: int):  # noqa: ANN001, ANN201
    from helpers.server import serve_in_background

    with serve_in_background(tiny_chat, port=port) as handle:
        yield handle


@pytest.fixture
def sent_messages(monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, str]]]:
    """The messages each LinlyClient.stream call sent (the real call still happens)."""
    from helpers.client import LinlyClient

    calls: list[list[dict[str, str]]] = []
    original = LinlyClient.stream

    def spy(self, messages, **params):  # noqa: ANN001, ANN003, ANN202
        calls.append([dict(m) for m in messages])
        return original(self, messages, **params)

    monkeypatch.setattr(LinlyClient, "stream", spy)
    return calls


def test_chat_box_streams_from_the_server_and_keeps_history(tiny_server, sent_messages) -> None:  # noqa: ANN001
    from helpers.widgets import chat_box

    box = chat_box(tiny_server.url, system="Be brief.", max_tokens=12, temperature=0.7, seed=1)
    shown: list[str] = []  # the conversation HTML as the browser would receive it, update by update
    box.conversation.observe(lambda change: shown.append(change["new"]), names="value")

    box.ask("What is the capital of France?")
    box.wait(60)
    kind, first = box.transcript[-1]
    assert kind == "assistant" and first, box.transcript
    growing = [html for html in shown if "dhllm-msg-assistant" in html]
    assert len(set(growing)) >= 3, "the answer should arrive in several pieces"

    box.ask("And of Germany?")
    box.wait(60)
    assert [m["role"] for m in box.history] == ["user", "assistant", "user", "assistant"]
    assert sent_messages[1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And of Germany?"},
    ]
    box.clear()
    assert box.history == [] and box.transcript == []


def test_chat_box_with_api_key(tiny_chat, port: int) -> None:  # noqa: ANN001
    from helpers.server import serve_in_background
    from helpers.widgets import chat_box

    with serve_in_background(tiny_chat, port=port, api_key="s3cret-key") as server:
        good = chat_box(server.url, api_key="s3cret-key", max_tokens=4)
        good.ask("hi")
        good.wait(60)
        assert good.transcript[-1][0] == "assistant"

        bad = chat_box(server.url, max_tokens=4)
        bad.ask("hi")
        bad.wait(60)
    kind, text = bad.transcript[-1]
    assert kind == "error" and "401" in text and "Traceback" not in text
    assert "s3cret-key" not in bad.conversation.value
    assert bad.history == []


def test_chat_box_says_when_the_server_is_down(port: int) -> None:
    from helpers.widgets import chat_box

    box = chat_box(f"http://127.0.0.1:{port}")  # nothing listens there
    box.ask("hi")
    box.wait(30)
    kind, text = box.transcript[-1]
    assert kind == "error"
    assert text.startswith(f"连不上服务器 http://127.0.0.1:{port}") and "make serve" in text
    assert "HTTPConnectionPool" not in text  # requests' nested reprs are cut to the errno line
