"""OpenAIChat against our own server (the tiny model behind /v1), and our server fronting a
cloud backend on the chapter's POST /, with no key in its answers or logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from helpers.chat import ChatModel, OpenAIChat
from tests.fakes import FakeServer, free_port
from tests.fakes.openai_fake import start_fake_openai

HISTORY = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]
GREEDY = {"max_new_tokens": 8, "temperature": 0}
KEY = "sk-dhllm-upstream-Secret-Hn5T"


def serve(app_or_model: Any) -> Any:
    from helpers.server import serve_in_background  # written by the server issue

    return serve_in_background(app_or_model, host="127.0.0.1", port=free_port())


@pytest.fixture(scope="module")
def local_server(tiny_chat: ChatModel) -> Iterator[Any]:
    with serve(tiny_chat) as handle:
        yield handle


@pytest.fixture
def client(local_server: Any, tiny_chat: ChatModel) -> OpenAIChat:
    return OpenAIChat.from_preset("dhllm", tiny_chat.name, base_url=local_server.url + "/v1",
                                  max_retries=0, timeout=60.0)


def test_plain_chat_matches_the_local_model(client: OpenAIChat, tiny_chat: ChatModel) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert client.chat(messages, **GREEDY) == tiny_chat.chat(messages, **GREEDY)


def test_stream_with_history_matches_the_local_model(client: OpenAIChat,
                                                     tiny_chat: ChatModel) -> None:
    pieces = list(client.stream(HISTORY, **GREEDY))
    assert pieces and "".join(pieces) == tiny_chat.chat(HISTORY, **GREEDY)
    assert client.chat(HISTORY, **GREEDY) == "".join(pieces)


@pytest.fixture
def upstream() -> Iterator[FakeServer]:
    with start_fake_openai(api_key=KEY) as fake:
        yield fake


def test_chapter_post_fronts_a_cloud_model_without_leaking_the_key(
    upstream: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good = OpenAIChat("gpt-4o-mini", api_key=KEY, base_url=upstream.base_url, max_retries=0)
    with serve(good) as handle:
        reply = requests.post(handle.url + "/", json={"prompt": "你好", "history": []}, timeout=30)
        assert reply.status_code == 200, reply.text
        assert "echo: 你好" in reply.json()["response"]
    wrong = OpenAIChat("gpt-4o-mini", api_key="sk-dhllm-wrong-Secret-Gq8W",
                       base_url=upstream.base_url, max_retries=0)
    with serve(wrong) as handle:
        reply = requests.post(handle.url + "/", json={"prompt": "你好", "history": []}, timeout=30)
        assert reply.status_code >= 400
        texts = [reply.text] + [r.getMessage() for r in caplog.records]
    for text in texts:
        for secret in (KEY, "sk-dhllm-wrong-Secret-Gq8W"):
            assert secret not in text and secret[-4:] not in text, text
