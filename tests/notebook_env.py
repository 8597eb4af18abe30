"""What the notebooks need under test: no hub (01 uses its local mirror) and the cloud fakes (04).

Notebook 04 reads keys and addresses from the environment only, so pointing it at the fakes
is a matter of environment variables; the notebook itself hard-codes none of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tests.fakes.gemini_fake import start_fake_gemini
from tests.fakes.openai_fake import start_fake_openai

# Test-only keys for the local fakes; the fakes reject any other key.
FAKE_OPENAI_KEY = "test-openai-key-for-local-fake"
FAKE_GEMINI_KEY = "test-gemini-key-for-local-fake"


@contextmanager
def notebook_services() -> Iterator[dict[str, str]]:
    """Start the provider fakes; yield the environment variables that point notebooks at them."""
    with start_fake_openai(api_key=FAKE_OPENAI_KEY) as openai_fake, \
            start_fake_gemini(api_key=FAKE_GEMINI_KEY) as gemini_fake:
        env = {
            "DHLLM_OFFLINE": "1",  # notebook 01: use the local mirror, never a real hub
            "OPENAI_API_KEY": FAKE_OPENAI_KEY,
            "OPENAI_BASE_URL": openai_fake.base_url,
            "GEMINI_API_KEY": FAKE_GEMINI_KEY,
            "GOOGLE_GEMINI_BASE_URL": gemini_fake.base_url,
        }
        for preset, key in [("ZHIPU", "ZHIPUAI"), ("DEEPSEEK", "DEEPSEEK"), ("DASHSCOPE", "DASHSCOPE")]:
            env[f"{key}_API_KEY"] = FAKE_OPENAI_KEY
            env[f"DHLLM_{preset}_BASE_URL"] = openai_fake.base_url
        yield env
