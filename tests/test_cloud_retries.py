"""Retries of both cloud backends, one parametrised test per behaviour, through the real SDKs.

429 then 200 is retried; 429 until retries run out is a RateLimitError with the server's delay;
5xx until retries run out is an UnavailableError. Other 4xx are never retried (see the
per-backend modules).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from helpers.chat import GeminiChat, OpenAIChat, RateLimitError, UnavailableError
from tests.fakes import ECHO, HISTORY, FakeServer
from tests.fakes.gemini_fake import start_fake_gemini
from tests.fakes.openai_fake import start_fake_openai

KEY = "sk-dhllm-retry-Secret-Q8vT"
BACKENDS: dict[str, tuple[Any, Any, str]] = {
    # name: (start the fake, build the model, its 429 message)
    "openai": (start_fake_openai, lambda url, **kw: OpenAIChat("gpt-4o-mini", base_url=url, **kw),
               "Rate limit reached"),
    "gemini": (start_fake_gemini, lambda url, **kw: GeminiChat(base_url=url, **kw),
               "exceeded your current quota"),
}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[str, FakeServer]]:
    with BACKENDS[request.param][0](api_key=KEY) as server:
        yield request.param, server


@pytest.fixture
def fake(backend: tuple[str, FakeServer], monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    for name in ("OPENAI_BASE_URL", "GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    backend[1].reset()
    return backend[1]


def model(backend: tuple[str, FakeServer], **kwargs: Any) -> Any:
    return BACKENDS[backend[0]][1](backend[1].base_url, api_key=KEY, timeout=10.0, **kwargs)


def test_429_then_200_is_retried(backend: tuple[str, FakeServer], fake: FakeServer) -> None:
    fake.fail_next(429, times=2, retry_after=0.05)
    assert model(backend).chat(HISTORY) == ECHO
    assert len(fake.model_requests) == 3


def test_429_until_retries_run_out(backend: tuple[str, FakeServer], fake: FakeServer) -> None:
    fake.fail_next(429, times=3, retry_after=0.05)
    with pytest.raises(RateLimitError) as info:
        model(backend, max_retries=2).chat(HISTORY)
    assert len(fake.model_requests) == 3
    assert BACKENDS[backend[0]][2] in info.value.provider_message
    assert info.value.retry_after == pytest.approx(0.05)


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_become_unavailable_after_retries(backend: tuple[str, FakeServer], fake: FakeServer,
                                              status: int) -> None:
    fake.fail_next(status, times=3, retry_after=0.01)
    with pytest.raises(UnavailableError, match=str(status)) as info:
        model(backend, max_retries=2).chat(HISTORY)
    assert len(fake.model_requests) == 3
    assert info.value.provider_message


def test_one_5xx_then_the_answer(backend: tuple[str, FakeServer], fake: FakeServer) -> None:
    fake.fail_next(503, retry_after=0.01)
    assert model(backend, max_retries=1).chat(HISTORY) == ECHO
    assert len(fake.model_requests) == 2
