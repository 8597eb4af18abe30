"""The notebook-test harness path: fakes started by function, backends pointed at them by
environment variables only (what notebook 04 runs under nbval)."""

from __future__ import annotations

import pytest
import requests

from helpers.chat import get_chat_model
from tests.fakes import provider_env
from tests.fakes.gemini_fake import start_fake_gemini
from tests.fakes.openai_fake import start_fake_openai

SPECS = ["openai:gpt-4o-mini", "deepseek:deepseek-v4-flash", "zhipu:glm-4-flash",
         "dashscope:qwen-plus", "moonshot:moonshot-v1-8k", "gemini:gemini-3.5-flash"]


def test_every_provider_reaches_its_fake_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with start_fake_openai() as openai_fake, start_fake_gemini() as gemini_fake:
        for name, value in provider_env(openai_fake, gemini_fake).items():
            monkeypatch.setenv(name, value)
        question = [{"role": "user", "content": "你好"}]
        for spec in SPECS:
            answer = "".join(get_chat_model(spec).stream(question))
            assert answer == "echo: 你好 (turns=1, system=none)", spec
        models = [r.json["model"] for r in openai_fake.model_requests]
        assert models == [s.split(":", 1)[1] for s in SPECS[:-1]]
        assert len(gemini_fake.model_requests) == 1
        assert requests.get(openai_fake.base_url + "/models", timeout=5).json()["data"]
