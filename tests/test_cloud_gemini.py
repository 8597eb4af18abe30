"""GeminiChat through the real google-genai SDK against a wire-level fake on 127.0.0.1."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator

import pytest

from helpers.chat import (
    AuthenticationError,
    BadRequestError,
    GeminiChat,
    UnavailableError,
    get_chat_model,
)
from helpers.secrets import MissingSecretError
from tests.fakes import ECHO, HISTORY, FakeServer
from tests.fakes.gemini_fake import start_fake_gemini

KEY = "AIza-dhllm-test-Secret-Jw4R"
WRONG_KEY = "AIza-dhllm-wrong-Secret-Mz2P"
ENV = ["GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL", "GOOGLE_GENAI_USE_VERTEXAI",
       "GOOGLE_GENAI_API_VERSION"]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with start_fake_gemini(api_key=KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def clean(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.reset()
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def model(fake: FakeServer, **kwargs: object) -> GeminiChat:
    options = {"api_key": KEY, "base_url": fake.base_url, "timeout": 10.0, **kwargs}
    return GeminiChat(**options)  # type: ignore[arg-type]


def assert_no_key(*texts: str) -> None:
    for text in texts:
        for secret in (KEY, WRONG_KEY):
            assert secret not in text and secret[-4:] not in text, text


def test_chat_maps_history_roles_and_system_instruction(fake: FakeServer) -> None:
    assert model(fake).chat(HISTORY) == ECHO
    [request] = fake.model_requests
    assert request.path.endswith("/models/gemini-3.5-flash:generateContent")
    assert request.headers["x-goog-api-key"] == KEY
    body = request.json
    assert [(c["role"], c["parts"][0]["text"]) for c in body["contents"]] == [
        ("user", "hi"), ("model", "hello"), ("user", "你好吗")]
    assert body["systemInstruction"]["parts"][0]["text"] == "简短回答"


def test_stream_via_sse(fake: FakeServer) -> None:
    pieces = list(model(fake).stream(HISTORY))
    assert len(pieces) > 1 and "".join(pieces) == ECHO
    [request] = fake.model_requests
    assert request.path.endswith(":streamGenerateContent") and request.query == {"alt": "sse"}


def test_base_url_from_google_gemini_base_url(fake: FakeServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", fake.base_url)  # read by google-genai
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    chat = get_chat_model("gemini:gemini-3.5-flash")
    assert chat.chat(HISTORY) == ECHO
    assert len(fake.model_requests) == 1


def test_google_api_key_also_works(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    assert GeminiChat(base_url=fake.base_url).chat(HISTORY) == ECHO


def test_params_mapping(fake: FakeServer) -> None:
    chat = model(fake)
    answer = chat.chat(HISTORY, max_new_tokens=2, temperature=0, top_p=0.5, top_k=4, seed=7,
                       stop=["never"])
    assert answer == "echo: 你好吗"  # cut at maxOutputTokens=2 words by the fake
    config = fake.model_requests[0].json["generationConfig"]
    assert (config["maxOutputTokens"], config["temperature"], config["topP"], config["topK"],
            config["seed"], config["stopSequences"]) == (2, 0, 0.5, 4, 7, ["never"])
    thinking = config["thinkingConfig"]  # minimal by default on Flash: short, fast answers
    assert thinking.get("thinkingLevel", thinking.get("thinking_level")) == "MINIMAL"
    assert "thinkingBudget" not in thinking  # never both: the API answers 400
    model(fake, model="gemini-2.5-flash").chat(HISTORY)
    old = fake.model_requests[-1].json["generationConfig"]["thinkingConfig"]
    assert old.get("thinkingBudget", old.get("thinking_budget")) == 0
    assert chat.chat(HISTORY, stop=" (turns") == "echo: 你好吗"
    chat.chat(HISTORY, repetition_penalty=1.2)
    assert "repetition_penalty" not in str(fake.model_requests[-1].json)


def test_thinking_left_alone_when_asked(fake: FakeServer) -> None:
    model(fake, thinking_budget=None).chat(HISTORY)
    assert "thinkingConfig" not in fake.model_requests[0].json.get("generationConfig", {})


def test_429_then_200_honours_retry_info(fake: FakeServer) -> None:
    fake.fail_next(429, times=2, retry_after=0.05)
    assert model(fake).chat(HISTORY) == ECHO
    assert len(fake.model_requests) == 3








def test_bad_key_is_an_auth_error_not_retried(fake: FakeServer) -> None:
    with pytest.raises(AuthenticationError) as info:
        GeminiChat(api_key=WRONG_KEY, base_url=fake.base_url).chat(HISTORY)
    assert len(fake.model_requests) == 1
    error = info.value
    assert error.provider_message == "API key not valid. Please pass a valid API key."
    assert "GEMINI_API_KEY" in str(error)
    assert_no_key(str(error), repr(error), "".join(traceback.format_exception(error)))


def test_retired_model_is_a_bad_request(fake: FakeServer) -> None:
    with pytest.raises(BadRequestError, match="gemini-pro is not found"):
        model(fake, model="gemini-pro").chat(HISTORY)
    assert len(fake.model_requests) == 1


def test_timeout_becomes_unavailable(fake: FakeServer) -> None:
    fake.delay_next(1.0)
    with pytest.raises(UnavailableError, match="timeout"):
        model(fake, timeout=0.3, max_retries=0).chat(HISTORY)


def test_stream_errors_are_mapped_and_retried(fake: FakeServer) -> None:
    fake.fail_next(429, retry_after=0.05)
    assert "".join(model(fake).stream(HISTORY)) == ECHO
    assert len(fake.model_requests) == 2
    with pytest.raises(AuthenticationError):
        list(GeminiChat(api_key=WRONG_KEY, base_url=fake.base_url).stream(HISTORY))


def test_missing_key_fails_before_any_request(fake: FakeServer) -> None:
    with pytest.raises(MissingSecretError, match="GEMINI_API_KEY") as info:
        GeminiChat(base_url=fake.base_url)
    assert "https://aistudio.google.com/apikey" in str(info.value)
    assert fake.requests == []


def test_no_key_in_repr_errors_or_logs(fake: FakeServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    chat = model(fake)
    fake.fail_next(429, retry_after=0.01)
    chat.chat(HISTORY)
    list(chat.stream(HISTORY))
    with pytest.raises(AuthenticationError) as info:
        GeminiChat(api_key=WRONG_KEY, base_url=fake.base_url).chat(HISTORY)
    assert caplog.records, "expected httpx's debug logs to be captured"
    logged = [r.getMessage() + repr(r.args) + repr(r.__dict__) for r in caplog.records]
    assert_no_key(repr(chat), str(info.value), repr(info.value), info.value.provider_message,
                  *logged)


# ---------------------------------------------------------------- retired default model names


def test_a_retired_gemini_default_falls_back_and_a_404_names_the_usable_models(
        caplog: pytest.LogCaptureFixture) -> None:
    from helpers.chat import GEMINI_MODELS

    first, second = GEMINI_MODELS[:2]
    with start_fake_gemini(api_key=KEY, models=[second, "gemini-other"]) as server:
        chat = get_chat_model("gemini", api_key=KEY, base_url=server.url, timeout=10.0)
        with caplog.at_level(logging.WARNING, logger="helpers.chat.gemini"):
            assert chat.chat([{"role": "user", "content": "hi"}]).startswith("echo: hi")
        assert chat.model == second and f"models/{second}:generateContent" in server.model_requests[0].path
        assert f"模型列表里没有 {first}" in caplog.text
        named = GeminiChat("gemini-gone", api_key=KEY, base_url=server.url, timeout=10.0)
        with pytest.raises(BadRequestError, match=f"这个密钥能用：{second}, gemini-other。"):
            named.chat([{"role": "user", "content": "hi"}])
