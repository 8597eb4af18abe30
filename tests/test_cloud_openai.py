"""OpenAIChat through the real openai SDK against a wire-level fake on 127.0.0.1."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator

import pytest

from helpers.chat import (
    PRESETS,
    AuthenticationError,
    BadRequestError,
    OpenAIChat,
    UnavailableError,
    get_chat_model,
)
from helpers.secrets import MissingSecretError
from tests.fakes import ECHO, HISTORY, FakeServer
from tests.fakes.openai_fake import start_fake_openai

KEY = "sk-dhllm-test-Secret-Qx9Z"
WRONG_KEY = "sk-dhllm-wrong-Secret-Vb7K"
ENV = ["OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_LOG", "DEEPSEEK_API_KEY", "ZHIPUAI_API_KEY",
       "DASHSCOPE_API_KEY", "MOONSHOT_API_KEY", "VLLM_API_KEY", "DHLLM_API_KEY",
       *(p.base_url_env for p in PRESETS.values())]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with start_fake_openai(api_key=KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def clean(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.reset()
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def model(fake: FakeServer, **kwargs: object) -> OpenAIChat:
    options = {"api_key": KEY, "base_url": fake.base_url, "timeout": 10.0, **kwargs}
    return OpenAIChat("gpt-4o-mini", **options)  # type: ignore[arg-type]


def assert_no_key(*texts: str) -> None:
    for text in texts:
        for secret in (KEY, WRONG_KEY):
            assert secret not in text and secret[-4:] not in text, text


def test_chat_with_history_and_system(fake: FakeServer) -> None:
    assert model(fake).chat(HISTORY) == ECHO
    [request] = fake.model_requests
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.json["messages"] == HISTORY
    assert request.json["model"] == "gpt-4o-mini" and not request.json.get("stream")


def test_stream_yields_pieces_of_the_same_answer(fake: FakeServer) -> None:
    pieces = list(model(fake).stream(HISTORY))
    assert len(pieces) > 1 and "".join(pieces) == ECHO
    assert fake.model_requests[0].json["stream"] is True


def test_params_mapping(fake: FakeServer) -> None:
    chat = model(fake)
    answer = chat.chat(HISTORY, max_new_tokens=2, temperature=0, top_p=0.5, seed=7,
                       stop=["never"])
    assert answer == "echo: 你好吗"  # cut at max_tokens=2 words by the fake
    body = fake.model_requests[0].json
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"],
            body["stop"]) == (2, 0, 0.5, 7, ["never"])
    assert "top_k" not in body and "repetition_penalty" not in body
    assert chat.chat(HISTORY, stop=" (turns") == "echo: 你好吗"


def test_top_k_dropped_and_logged_where_unsupported(fake: FakeServer,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="helpers.chat.cloud_common")
    chat = model(fake)
    chat.chat(HISTORY, top_k=5)
    chat.chat(HISTORY, top_k=5)
    assert all("top_k" not in r.json for r in fake.model_requests)
    notes = [r.getMessage() for r in caplog.records if r.name == "helpers.chat.cloud_common"]
    assert notes == ["openai:gpt-4o-mini has no top_k: ignored"]  # once per backend


def test_top_k_and_repetition_penalty_as_extra_body_where_supported(fake: FakeServer) -> None:
    chat = OpenAIChat.from_preset("vllm", "some-model", base_url=fake.base_url, api_key=KEY)
    chat.chat(HISTORY, top_k=5, repetition_penalty=1.1)
    body = fake.model_requests[0].json
    assert (body["top_k"], body["repetition_penalty"], body["model"]) == (5, 1.1, "some-model")






def test_401_is_not_retried_and_keeps_the_provider_message(fake: FakeServer) -> None:
    with pytest.raises(AuthenticationError) as info:
        OpenAIChat("gpt-4o-mini", api_key=WRONG_KEY, base_url=fake.base_url).chat(HISTORY)
    assert len(fake.model_requests) == 1
    error = info.value
    assert "Incorrect API key provided" in error.provider_message
    assert "OPENAI_API_KEY" in str(error)
    assert_no_key(str(error), repr(error), error.provider_message,
                  "".join(traceback.format_exception(error)))






def test_timeout_becomes_unavailable(fake: FakeServer) -> None:
    fake.delay_next(1.0)
    with pytest.raises(UnavailableError, match="timeout"):
        model(fake, timeout=0.3, max_retries=0).chat(HISTORY)


def test_400_is_a_bad_request_not_retried(fake: FakeServer) -> None:
    fake.fail_next(400, message="Invalid value for 'temperature'.")
    with pytest.raises(BadRequestError) as info:
        model(fake).chat(HISTORY)
    assert info.value.provider_message == "Invalid value for 'temperature'."
    assert len(fake.model_requests) == 1


def test_404_model_says_so(fake: FakeServer) -> None:
    fake.fail_next(404)
    with pytest.raises(BadRequestError, match="model name"):
        model(fake).chat(HISTORY)


def test_stream_errors_are_mapped_and_retried(fake: FakeServer) -> None:
    fake.fail_next(429, retry_after=0.05)
    assert "".join(model(fake).stream(HISTORY)) == ECHO
    assert len(fake.model_requests) == 2
    with pytest.raises(AuthenticationError):
        list(OpenAIChat("m", api_key=WRONG_KEY, base_url=fake.base_url).stream(HISTORY))


def test_connection_refused_is_unavailable() -> None:
    from tests.fakes import free_port

    chat = OpenAIChat("m", api_key=KEY, base_url=f"http://127.0.0.1:{free_port()}/v1",
                      max_retries=0)
    with pytest.raises(UnavailableError, match="cannot connect"):
        chat.chat(HISTORY)


def test_missing_key_fails_before_any_request(fake: FakeServer) -> None:
    with pytest.raises(MissingSecretError, match="OPENAI_API_KEY") as info:
        OpenAIChat("gpt-4o-mini", base_url=fake.base_url)
    assert "https://platform.openai.com/api-keys" in str(info.value)
    with pytest.raises(MissingSecretError, match="ZHIPUAI_API_KEY"):
        get_chat_model("zhipu:glm-4-flash", base_url=fake.base_url)
    assert fake.requests == []


def test_key_and_base_url_from_the_environment(fake: FakeServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)  # read by the openai SDK itself
    assert get_chat_model("openai:gpt-4o-mini").chat(HISTORY) == ECHO
    assert fake.model_requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_preset_base_url_override_and_explicit_wins(fake: FakeServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZHIPUAI_API_KEY", KEY)
    monkeypatch.setenv("DHLLM_ZHIPU_BASE_URL", fake.base_url)
    zhipu = get_chat_model("zhipu:glm-4-flash")
    assert zhipu.chat(HISTORY) == ECHO
    assert fake.model_requests[0].json["model"] == "glm-4-flash"
    explicit = get_chat_model("zhipu", base_url="http://127.0.0.1:9/v1")
    assert explicit.base_url.startswith("http://127.0.0.1:9/v1")


def test_local_servers_need_no_key(fake: FakeServer) -> None:
    fake.state.api_key = None  # like a local vLLM / Ollama started without --api-key
    try:
        for spec in ("ollama:qwen2.5:1.5b", "vllm:m", "dhllm:embedded"):
            assert get_chat_model(spec, base_url=fake.base_url).chat(HISTORY) == ECHO
        assert fake.model_requests[0].json["model"] == "qwen2.5:1.5b"
    finally:
        fake.state.api_key = KEY


def test_no_key_in_repr_errors_or_logs(fake: FakeServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # the SDK and httpx log requests at DEBUG
    chat = model(fake)
    fake.fail_next(429, retry_after=0.01)
    chat.chat(HISTORY)
    list(chat.stream(HISTORY))
    with pytest.raises(AuthenticationError) as info:
        OpenAIChat("gpt-4o-mini", api_key=WRONG_KEY, base_url=fake.base_url).chat(HISTORY)
    assert caplog.records, "expected the SDK's debug logs to be captured"
    logged = [r.getMessage() + repr(r.args) + repr(r.__dict__) for r in caplog.records]
    assert_no_key(repr(chat), str(chat), format(chat), str(info.value), repr(info.value), *logged)


# ---------------------------------------------------------------- retired default model names


@pytest.fixture()
def retired() -> Iterator[FakeServer]:
    """A provider that no longer lists the openai preset's first choice (a retired default)."""
    first, second = PRESETS["openai"].models[:2]
    with start_fake_openai(api_key=KEY, models=[second, "some-other-model"]) as server:
        yield server


def test_a_retired_default_falls_back_along_the_preference_list_and_says_so(
        retired: FakeServer, caplog: pytest.LogCaptureFixture) -> None:
    first, second = PRESETS["openai"].models[:2]
    chat = OpenAIChat(api_key=KEY, base_url=retired.base_url, timeout=10.0)  # no model: default
    assert chat.model == first
    with caplog.at_level(logging.WARNING, logger="helpers.chat.openai_chat"):
        assert chat.chat([{"role": "user", "content": "hi"}]) == "echo: hi (turns=1, system=none)"
    [request] = retired.model_requests
    assert request.json["model"] == second and chat.model == second
    assert chat.name == f"openai:{second}"
    assert f"模型列表里没有 {first}" in caplog.text and f"改用 {second}" in caplog.text
    chat.chat([{"role": "user", "content": "again"}])  # the list is asked once
    assert [r.path for r in retired.requests].count("/v1/models") == 1


def test_a_model_name_given_is_used_as_is_and_its_404_names_the_usable_models(
        retired: FakeServer) -> None:
    chat = OpenAIChat("gpt-4o-mini-retired", api_key=KEY, base_url=retired.base_url, timeout=10.0)
    with pytest.raises(BadRequestError) as caught:
        chat.chat([{"role": "user", "content": "hi"}])
    text = str(caught.value)
    assert "404" in text and "gpt-4o-mini-retired" in text
    assert f"这个密钥能用：{PRESETS['openai'].models[1]}, some-other-model。" in text


def test_no_preferred_model_listed_names_the_usable_ones_before_any_chat_request() -> None:
    with start_fake_openai(api_key=KEY, models=["only-this-one"]) as server:
        chat = get_chat_model("openai", api_key=KEY, base_url=server.base_url, timeout=10.0)
        with pytest.raises(BadRequestError, match="这个密钥能用：only-this-one。请指定一个："
                                                  "openai:模型名"):
            chat.chat([{"role": "user", "content": "hi"}])
        assert server.model_requests == []


def test_a_local_server_preset_uses_the_one_model_it_serves() -> None:
    with start_fake_openai(models=["my-served-model"]) as server:
        chat = get_chat_model("vllm", base_url=server.base_url, timeout=10.0)
        chat.chat([{"role": "user", "content": "hi"}])
        assert server.model_requests[0].json["model"] == "my-served-model"


def test_dhllm_chat_with_a_bare_provider_follows_the_same_rule(retired: FakeServer) -> None:
    """`dhllm chat --model openai` against a provider that retired the default still answers."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env.update(OPENAI_API_KEY=KEY, OPENAI_BASE_URL=retired.base_url)
    done = subprocess.run([sys.executable, "-m", "helpers", "chat", "hi", "--model", "openai"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "echo: hi" in done.stdout
    assert f"改用 {PRESETS['openai'].models[1]}" in done.stderr
    assert retired.model_requests[0].json["model"] == PRESETS["openai"].models[1]
