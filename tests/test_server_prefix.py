"""Prefix reuse over real HTTP: a conversation's later turns reuse its earlier KV, same answers."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from helpers.bench.persona import PERSONA, TURNS
from helpers.chat import TransformersChat
from helpers.server import serve_in_background

SYSTEM = PERSONA[:700]
# Greedy with a strong penalty: the random tiny model then gives varied answers.
PARAMS = {"temperature": 0, "repetition_penalty": 5.0}


def openai_turns(url: str, turns: int = 3) -> list[str]:
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    answers = []
    for question in TURNS[:turns]:
        messages.append({"role": "user", "content": question})
        body = {"messages": messages, "max_tokens": 12, **PARAMS}
        response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        response.raise_for_status()
        answer = response.json()["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return answers


def chapter_turns(url: str, turns: int = 3) -> list[str]:
    history: list[Any] = [{"role": "system", "content": SYSTEM}]
    answers = []
    for question in TURNS[:turns]:
        body = {"prompt": question, "history": history, "max_length": 12, **PARAMS}
        response = requests.post(f"{url}/", json=body, timeout=60)
        response.raise_for_status()
        answers.append(response.json()["response"])
        history += [{"role": "user", "content": question},
                    {"role": "assistant", "content": answers[-1]}]
    return answers


def stats(url: str) -> dict[str, int]:
    return requests.get(f"{url}/health", timeout=10).json()["stats"]


@pytest.mark.parametrize("talk", [openai_turns, chapter_turns], ids=["openai", "chapter"])
def test_a_conversation_reuses_its_prefix_over_http(tiny_chat: TransformersChat, port, talk,
                                                    monkeypatch):
    with serve_in_background(tiny_chat, port=port) as handle:
        first = talk(handle.url, 1)
        after_one = stats(handle.url)
        answers = first + talk(handle.url, 3)[1:]  # the same conversation, carried on
        after = stats(handle.url)
    assert after_one["cache_hits"] == 0 and after_one["cache_blocks"] > 0
    assert after["cached_tokens"] > 0 and after["cache_hits"] >= 2
    # The same conversation on a server with the cache off (the app's own settings) gives the
    # same answers.
    with serve_in_background(tiny_chat, port=port, prefix_cache_mb=0) as handle:
        plain = talk(handle.url, 3)
        plain_stats = stats(handle.url)
    assert plain_stats["cached_tokens"] == 0 and plain_stats["cache_blocks"] == 0
    assert answers == plain
    assert len(set(answers)) > 1


def test_usage_reports_cached_tokens_as_openai_does(tiny_chat: TransformersChat, port) -> None:
    """``usage.prompt_tokens_details.cached_tokens``, plain and streamed (include_usage)."""
    from openai import OpenAI

    with serve_in_background(tiny_chat, port=port) as handle:
        client = OpenAI(base_url=handle.url + "/v1", api_key="unused")
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
        first = client.chat.completions.create(model="m", messages=messages, max_tokens=8,
                                               extra_body={"repetition_penalty": 5.0},
                                               temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": TURNS[1]}]
        chunks = list(client.chat.completions.create(
            model="m", messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        assert usage is not None and usage.prompt_tokens_details.cached_tokens > 0
        assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_a_top_p_below_float32_range_still_answers(tiny_chat: TransformersChat, port) -> None:
    """Found by schemathesis: top_p=2.7e-66 rounds to 0 in float32, the nucleus kept nothing,
    sampling raised after the prefill group was cleared, and the request was lost (no answer)."""
    with serve_in_background(tiny_chat, port=port) as handle:
        for content in ("", "hi"):
            body = {"messages": [{"role": "user", "content": content}], "top_p": 2.7e-66,
                    "max_tokens": 4}
            response = requests.post(f"{handle.url}/v1/chat/completions", json=body, timeout=30)
            assert response.status_code == 200, response.text
        assert stats(handle.url)["completed"] == 2
