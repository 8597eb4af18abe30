"""Both contracts over real HTTP on 127.0.0.1: the chapter's POST /, OpenAI's /v1, bad input."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from helpers.chat import ChatModel, TransformersChat, parse_linly_prompt
from helpers.client import get_completion
from helpers.server import ServerHandle, serve_in_background
from tests.conftest import free_port

# Linly-Talker's api client (LLM/Linly.py) folds system, history and question into one prompt.
LINLY_TALKER_PROMPT = ("请用少于25个字回答以下问题\n\n你是一个助手。 User: 你好 Bot: 你好！有什么可以帮你？ "
                       "### Instruction:如何应对压力  ### Response:")


class EchoChat(ChatModel):
    """A backend that answers with the messages it was given: shows exactly what the model saw."""

    name = "echo"

    def stream(self, messages, **params):
        yield json.dumps(list(messages), ensure_ascii=False)


def serve(model: ChatModel, **settings: Any) -> ServerHandle:
    settings.setdefault("default_max_new_tokens", 16)  # tiny model: keep replies short
    return serve_in_background(model, host="127.0.0.1", port=free_port(), **settings)


@pytest.fixture(scope="module")
def server(tiny_chat: TransformersChat) -> Iterator[ServerHandle]:
    with serve(tiny_chat) as handle:
        yield handle


@pytest.fixture(scope="module")
def echo_server() -> Iterator[ServerHandle]:
    with serve(EchoChat()) as handle:
        yield handle


@pytest.fixture(scope="module")
def linly_server(tiny_llama_dir) -> Iterator[tuple[ServerHandle, TransformersChat]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = TransformersChat(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                            AutoTokenizer.from_pretrained(tiny_llama_dir), "linly", "tiny-linly")
    with serve(chat) as handle:
        yield handle, chat


def stats(handle: ServerHandle) -> dict[str, int]:
    return requests.get(handle.url + "/health", timeout=10).json()["stats"]


# ---------------------------------------------------------------------------------------------
# The chapter's contract.


def test_chapter_curl_verbatim(server):
    port = server.url.rsplit(":", 1)[1]
    out = subprocess.run(
        ["curl", "-s", "-X", "POST", f"http://127.0.0.1:{port}", "-H",
         "Content-Type: application/json", "-d", '{"prompt": "如何应对压力"}'],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    body = json.loads(out)
    assert set(body) == {"response", "history", "status", "time"}
    assert body["status"] == 200 and isinstance(body["response"], str) and body["response"]
    assert body["history"] == [["如何应对压力", body["response"]]]
    assert len(body["time"]) == 19  # YYYY-mm-dd HH:MM:SS


def test_chapter_get_completion(server, tiny_chat):
    # The chapter's own code: requests.post(url=..., headers=..., data=json.dumps(...)).
    answer = get_completion("What is 2+2?", url=server.url, temperature=0, max_length=6)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert answer == tiny_chat.chat(messages, max_new_tokens=6, temperature=0,
                                    repetition_penalty=1.15)  # the chapter's default penalty


def test_history_is_honoured_in_both_shapes(echo_server):
    first = requests.post(echo_server.url, json={"prompt": "A"}, timeout=10).json()
    assert json.loads(first["response"]) == [{"role": "user", "content": "A"}]
    second = requests.post(echo_server.url, json={"prompt": "B", "history": first["history"]},
                           timeout=10).json()
    seen = json.loads(second["response"])
    assert seen == [{"role": "user", "content": "A"},
                    {"role": "assistant", "content": first["response"]},
                    {"role": "user", "content": "B"}]
    as_dicts = requests.post(echo_server.url, json={"prompt": "B", "history": seen[:2]},
                             timeout=10).json()
    assert json.loads(as_dicts["response"]) == seen
    assert second["history"] == [["A", first["response"]], ["B", second["response"]]]


def test_history_reaches_the_local_model(server, tiny_chat):
    before = stats(server)["prompt_tokens"]
    requests.post(server.url, json={"prompt": "B", "max_length": 1}, timeout=30).raise_for_status()
    alone = stats(server)["prompt_tokens"] - before
    history = [["A long first question about the weather", "A long first answer"]]
    requests.post(server.url, json={"prompt": "B", "history": history, "max_length": 1},
                  timeout=30).raise_for_status()
    with_history = stats(server)["prompt_tokens"] - before - alone
    expected = tiny_chat.prompt_ids([
        {"role": "user", "content": history[0][0]},
        {"role": "assistant", "content": history[0][1]},
        {"role": "user", "content": "B"},
    ])
    assert with_history == len(expected) > alone


def test_linly_talker_prompt_parsed_for_a_chat_template_model(echo_server, server, tiny_chat):
    reply = requests.post(echo_server.url, json={"prompt": LINLY_TALKER_PROMPT}, timeout=10).json()
    assert json.loads(reply["response"]) == [
        {"role": "system", "content": "你是一个助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "如何应对压力"},
    ]
    assert reply["history"][-1][0] == "如何应对压力"  # the question, not the template
    before = stats(server)["prompt_tokens"]
    requests.post(server.url, json={"prompt": LINLY_TALKER_PROMPT, "max_length": 1},
                  timeout=30).raise_for_status()
    used = stats(server)["prompt_tokens"] - before
    assert used == len(tiny_chat.prompt_ids(parse_linly_prompt(LINLY_TALKER_PROMPT)))


def test_linly_prompt_used_verbatim_by_a_linly_model(linly_server):
    handle, chat = linly_server
    before = stats(handle)["prompt_tokens"]
    reply = requests.post(handle.url, json={"prompt": LINLY_TALKER_PROMPT, "max_length": 2},
                          timeout=30)
    assert reply.status_code == 200, reply.text
    used = stats(handle)["prompt_tokens"] - before
    assert used == len(chat.tokenizer(LINLY_TALKER_PROMPT)["input_ids"])  # not wrapped again
    # A plain question gets the chapter's template exactly once.
    before = stats(handle)["prompt_tokens"]
    requests.post(handle.url, json={"prompt": "如何应对压力", "max_length": 1}, timeout=30)
    wrapped = chat.render_prompt([{"role": "user", "content": "如何应对压力"}])
    assert wrapped.count("### Instruction:") == 1
    assert stats(handle)["prompt_tokens"] - before == len(chat.tokenizer(wrapped)["input_ids"])


# ---------------------------------------------------------------------------------------------
# The OpenAI contract, with the real SDK.


def test_openai_sdk_plain_and_stream(server, tiny_chat):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [tiny_chat.name]
    messages = [{"role": "user", "content": "Hello"}]
    reply = client.chat.completions.create(model=tiny_chat.name, messages=messages,
                                           max_tokens=7, temperature=0)
    text = reply.choices[0].message.content
    assert text == tiny_chat.chat(messages, max_new_tokens=7, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens <= 7 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model=tiny_chat.name, messages=messages, max_tokens=7, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 7


def test_sse_wire_format_ends_with_done(server):
    response = requests.post(server.url + "/v1/chat/completions", stream=True, timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
        "stop": ["zzzz"], "seed": 3})
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    assert all(line.startswith(b"data: ") for line in lines)


# ---------------------------------------------------------------------------------------------
# Bad input: a 4xx that names the field, never a 500, never a hang.

BAD_CHAPTER = [
    ("not json", "body", 400),
    ({"prompt": 5}, "prompt", 422),
    ({}, "prompt", 422),
    ({"prompt": ""}, "prompt", 422),
    ({"prompt": "   "}, "prompt", 422),
    ({"prompt": "x", "history": [{"role": "robot", "content": "x"}]}, "history", 422),
    ({"prompt": "x", "history": [["only one"]]}, "history", 422),
    ({"prompt": "x", "history": "nope"}, "history", 422),
    ({"prompt": "x", "max_length": 0}, "max_length", 422),
    ({"prompt": "x", "max_length": -3}, "max_length", 422),
    ({"prompt": "x", "max_length": 10**6}, "max_length", 422),
    ({"prompt": "x", "max_length": "12"}, "max_length", 422),
    ({"prompt": "x", "temperature": -0.1}, "temperature", 422),
    ({"prompt": "x", "top_p": 0}, "top_p", 422),
    ({"prompt": "x", "top_p": 1.5}, "top_p", 422),
    ({"prompt": "长" * 1_000_000}, "prompt", 413),
    ([1, 2], "body", 400),
]


@pytest.mark.parametrize(("body", "field", "status"), BAD_CHAPTER)
def test_bad_chapter_input(server, body, field, status):
    if isinstance(body, str):
        response = requests.post(server.url, data=body, timeout=30)
    else:
        response = requests.post(server.url, json=body, timeout=30)
    assert response.status_code == status, response.text
    assert field in response.text


BAD_OPENAI = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 2}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "长" * 1_000_000}]}, "messages"),
]


@pytest.mark.parametrize(("body", "param"), BAD_OPENAI)
def test_bad_openai_input_uses_openai_error_shape(server, body, param):
    response = requests.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_non_json_on_v1_is_400(server):
    response = requests.post(server.url + "/v1/chat/completions", data=b"\xff{",
                             headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
