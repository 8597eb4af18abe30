"""OpenAI-compatible providers by name: base URL, default model and key variable. Data only."""

from __future__ import annotations

from dataclasses import dataclass

from helpers.config import DEFAULT_URL


@dataclass(frozen=True)
class Preset:
    """An OpenAI-compatible provider: where it is, which model by default, which key."""

    name: str
    base_url: str | None  # None: the openai SDK's default (OPENAI_BASE_URL or api.openai.com)
    # Preference list, best first: the first one the provider still lists is used (names retire).
    models: tuple[str, ...]
    key_env: str | None  # the variable holding the key
    key_required: bool = True
    key_url: str | None = None  # where to get a key
    # GenerationParams the OpenAI protocol lacks but this server takes as extra body fields.
    extra_params: tuple[str, ...] = ()
    note: str = ""

    @property
    def default_model(self) -> str:
        """The first choice; ``OpenAIChat`` falls back along ``models`` when it is gone."""
        return self.models[0]

    @property
    def base_url_env(self) -> str:
        """The environment variable that overrides this preset's base URL."""
        return f"DHLLM_{self.name.upper()}_BASE_URL"


# Names retire. As of 2026-12: gpt-4o-mini shuts down on 2027-01-14, replacement gpt-6-luna
# (https://developers.openai.com/api/docs/deprecations); deepseek-chat / deepseek-reasoner stopped
# answering after 2026-07-24 (https://api-docs.deepseek.com/news/news260424), and DeepSeek's docs
# now name deepseek-flash, still accepting deepseek-v4-flash (https://api-docs.deepseek.com/).
# So each default is a preference list, checked against the provider's models.list() first.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("openai", None, ("gpt-6-luna", "gpt-5.6-luna", "gpt-4o-mini"), "OPENAI_API_KEY",
               key_url="https://platform.openai.com/api-keys", note="ChatGPT"),
        Preset("deepseek", "https://api.deepseek.com", ("deepseek-flash", "deepseek-v4-flash"),
               "DEEPSEEK_API_KEY", key_url="https://platform.deepseek.com/api_keys"),
        Preset("zhipu", "https://open.bigmodel.cn/api/paas/v4/", ("glm-4-flash",), "ZHIPUAI_API_KEY",
               key_url="https://open.bigmodel.cn/usercenter/apikeys",
               note="ChatGLM's maker; glm-4-flash is free of charge"),
        Preset("dashscope", "https://dashscope.aliyuncs.com/compatible-mode/v1",
               ("qwen-plus", "qwen-turbo"), "DASHSCOPE_API_KEY",
               key_url="https://help.aliyun.com/zh/model-studio/get-api-key",
               extra_params=("top_k", "repetition_penalty"), note="Qwen, OpenAI-compatible mode"),
        Preset("moonshot", "https://api.moonshot.cn/v1", ("moonshot-v1-8k",), "MOONSHOT_API_KEY",
               key_url="https://platform.moonshot.cn/console/api-keys", note="Kimi"),
        # Local servers serve one model under their own name: the first one listed is used.
        Preset("vllm", "http://127.0.0.1:8000/v1", ("default",), "VLLM_API_KEY", key_required=False,
               extra_params=("top_k", "repetition_penalty"),
               note="vllm serve MODEL; the model name is what vLLM serves (see /v1/models)"),
        Preset("ollama", "http://127.0.0.1:11434/v1", ("qwen2.5:1.5b",), None, key_required=False,
               note="ollama serve; needs no key"),
        Preset("dhllm", f"{DEFAULT_URL}/v1", ("embedded",), "DHLLM_API_KEY",
               key_required=False, extra_params=("top_k", "repetition_penalty"),
               note="our own dhllm serve; a key only if the server was started with one"),
    ]
}

# gemini-pro is gone; Google's deprecation table lists gemini-2.5-flash for shutdown, but copies
# of it disagree on the date (https://ai.google.dev/gemini-api/docs/deprecations), so none here.
# Preference list, best first; gemini-flash-latest is Google's alias that follows new Flash models.
GEMINI_MODELS = ("gemini-3.5-flash", "gemini-flash-latest")
GEMINI_DEFAULT_MODEL = GEMINI_MODELS[0]
GEMINI_KEY_ENVS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None

