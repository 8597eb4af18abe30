"""get_chat_model picks local or cloud backends from one string; cloud imports stay lazy."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers.chat import PRESETS, GeminiChat, OpenAIChat, get_chat_model, get_preset
from helpers.models import UnsupportedModelError

KEY_ENVS = sorted({p.key_env for p in PRESETS.values() if p.key_env} | {"GEMINI_API_KEY"})


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every provider's key set to a dummy: building a backend sends nothing."""
    for name in KEY_ENVS:
        monkeypatch.setenv(name, "dummy-key-for-construction")
    for preset in PRESETS.values():
        monkeypatch.delenv(preset.base_url_env, raising=False)
    for name in ("OPENAI_BASE_URL", "GOOGLE_GEMINI_BASE_URL", "GOOGLE_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_importing_helpers_does_not_import_the_sdks() -> None:
    code = ("import sys, helpers.chat, helpers.secrets; "
            "print(sorted(m for m in ('openai', 'google.genai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("spec", "preset", "model", "base_url"),
    [
        ("openai:gpt-4o-mini", "openai", "gpt-4o-mini", "https://api.openai.com/v1/"),
        ("deepseek:deepseek-v4-flash", "deepseek", "deepseek-v4-flash", "https://api.deepseek.com"),
        ("zhipu:glm-4-flash", "zhipu", "glm-4-flash", "https://open.bigmodel.cn/api/paas/v4/"),
        ("dashscope:qwen-plus", "dashscope", "qwen-plus",
         "https://dashscope.aliyuncs.com/compatible-mode/v1"),
        ("moonshot:kimi-k2", "moonshot", "kimi-k2", "https://api.moonshot.cn/v1"),
        ("vllm:Qwen/Qwen2.5-1.5B-Instruct", "vllm", "Qwen/Qwen2.5-1.5B-Instruct",
         "http://127.0.0.1:8000/v1"),
        ("ollama:qwen2.5:1.5b", "ollama", "qwen2.5:1.5b", "http://127.0.0.1:11434/v1"),
        ("dhllm:embedded", "dhllm", "embedded", "http://127.0.0.1:7871/v1"),
        ("zhipu", "zhipu", "glm-4-flash", "https://open.bigmodel.cn/api/paas/v4/"),
        ("deepseek:", "deepseek", "deepseek-flash", "https://api.deepseek.com"),
    ],
)
def test_presets(spec: str, preset: str, model: str, base_url: str) -> None:
    chat = get_chat_model(spec)
    assert isinstance(chat, OpenAIChat)
    assert (chat.preset.name, chat.model, chat.name) == (preset, model, f"{preset}:{model}")
    assert chat.base_url.rstrip("/") == base_url.rstrip("/")


def test_every_cloud_preset_names_its_key_and_where_to_get_one() -> None:
    for preset in PRESETS.values():
        if preset.key_required:
            assert preset.key_env and preset.key_url and preset.key_url.startswith("https://")


def test_gemini_spec_and_options_pass_through() -> None:
    chat = get_chat_model("gemini:gemini-2.5-pro", api_key="k", base_url="http://127.0.0.1:9",
                          timeout=5.0)
    assert isinstance(chat, GeminiChat)
    assert (chat.model, chat.name, chat.timeout) == ("gemini-2.5-pro", "gemini:gemini-2.5-pro", 5)
    assert chat.thinking == {}  # 2.5 pro cannot switch thinking off: its own default
    assert get_chat_model("gemini").model == "gemini-3.5-flash"
    openai_chat = get_chat_model("openai:gpt-4o-mini", timeout=7.5, max_retries=1)
    timeout = openai_chat.client.timeout  # a short connect part, never longer than the whole
    assert (timeout.read, timeout.connect, openai_chat.client.max_retries) == (7.5, 7.5, 1)


def test_unknown_prefix_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown backend 'claude'") as info:
        get_chat_model("claude:sonnet")
    for prefix in ("local", "gemini", "openai", "zhipu", "deepseek", "dashscope", "ollama"):
        assert f"{prefix}:MODEL" in str(info.value)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("claude")


def test_chatglm3_fails_fast_naming_versions_and_the_native_successor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import transformers

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("chatglm3-6b must be refused before any download")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_download)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_download)
    with pytest.raises(UnsupportedModelError) as info:
        get_chat_model("local:chatglm3-6b")
    message = str(info.value)
    assert "4.45" in message and transformers.__version__ in message
    assert "glm-4-9b-chat-hf" in message


def test_clouds_with_keys_follows_the_chapters_order_and_sees_every_provider(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's pick: a Zhipu-only learner is not told "no cloud key set"."""
    from helpers.chat import clouds_with_keys

    assert clouds_with_keys()[:3] == ["gemini", "openai", "zhipu"]  # every key set (fixture)
    for name in KEY_ENVS:
        monkeypatch.delenv(name, raising=False)
    assert clouds_with_keys() == []
    monkeypatch.setenv("ZHIPUAI_API_KEY", "dummy")
    assert clouds_with_keys() == ["zhipu"]
    monkeypatch.setenv("GOOGLE_API_KEY", "dummy")  # Gemini's second variable counts too
    assert clouds_with_keys() == ["gemini", "zhipu"]
