"""API keys: from the environment, else Colab's secrets, else a clear error. Never a prompt.

``getpass``/``input`` would hang a notebook run unattended (nbval, CI), so a missing key raises
``MissingSecretError`` at once, naming the variable, where to get a key and how to set it.
``MissingSecretError`` subclasses our ``AuthenticationError`` (not ``KeyError``, whose ``str()``
wraps the message in quotes), so ``except ChatModelError`` and the server's error mapping cover it.
Keys never appear in messages: ``redact`` strips them from provider messages we pass on.
"""

from __future__ import annotations

import os
import re

from helpers.errors import AuthenticationError

# Where a learner gets each key: shown in the error when it is missing.
KEY_SOURCES: dict[str, tuple[str, str]] = {
    "OPENAI_API_KEY": ("OpenAI", "https://platform.openai.com/api-keys"),
    "GEMINI_API_KEY": ("Google Gemini", "https://aistudio.google.com/apikey"),
    "GOOGLE_API_KEY": ("Google Gemini", "https://aistudio.google.com/apikey"),
    "DEEPSEEK_API_KEY": ("DeepSeek", "https://platform.deepseek.com/api_keys"),
    "ZHIPUAI_API_KEY": ("Zhipu AI (GLM / ChatGLM)", "https://open.bigmodel.cn/usercenter/apikeys"),
    "DASHSCOPE_API_KEY": (
        "Alibaba Cloud Model Studio / DashScope (Qwen)",
        "https://help.aliyun.com/zh/model-studio/get-api-key",
    ),
    "MOONSHOT_API_KEY": ("Moonshot AI (Kimi)", "https://platform.moonshot.cn/console/api-keys"),
}


class MissingSecretError(AuthenticationError):
    """A key is set neither in the environment nor in Colab's secrets; the message says how."""

    def __init__(self, name: str, purpose: str | None = None, hint: str | None = None) -> None:
        self.name = name
        provider, url = KEY_SOURCES.get(name, (None, None))
        needed = f" (needed for {purpose or provider})" if (purpose or provider) else ""
        where = f"Get a key at {url}, then set it" if url else "Set it"
        zh_for = f"（{purpose or provider} 需要它）" if (purpose or provider) else ""
        zh_get = f"先到 {url} 申请，然后" if url else ""
        message = (
            f"没有设置 API 密钥 {name}{zh_for}。{zh_get}在启动 Python 或 Jupyter 的终端里设置环境变量"
            f"（export {name}=...），或者在 Colab 左侧栏的钥匙图标里添加名为 {name} 的密钥并打开 "
            f"notebook 访问权限。不要把密钥粘贴进 notebook 的单元格：它会随 notebook 一起保存。 / "
            f"{name} is not set{needed}. {hint + ' ' if hint else ''}{where} either as an "
            f"environment variable in the shell that starts Python or Jupyter "
            f"(export {name}=...), or on Colab as a secret: the key icon in the left sidebar, "
            f"name {name}, with notebook access on. Do not paste a key into a notebook cell: "
            f"it would be saved with the notebook."
        )
        super().__init__(message)


def get_secret(name: str, purpose: str | None = None) -> str:
    """The value of ``name`` from the environment, else Colab's secrets, else MissingSecretError."""
    value = os.environ.get(name, "").strip()
    if value:
        return value
    value = _colab_secret(name, purpose)
    if value:
        return value
    raise MissingSecretError(name, purpose)


def has_secret(name: str) -> bool:
    """True if ``get_secret(name)`` would return a value."""
    try:
        get_secret(name)
    except MissingSecretError:
        return False
    return True


def _colab_secret(name: str, purpose: str | None) -> str | None:
    try:
        from google.colab import userdata  # only exists on Colab
    except ImportError:
        return None
    try:
        value = userdata.get(name)
    except Exception as exc:  # Colab's own SecretNotFoundError, NotebookAccessError, TimeoutException
        if type(exc).__name__ == "NotebookAccessError":
            raise MissingSecretError(
                name, purpose, hint="The Colab secret exists but this notebook may not read it: "
                "switch on its notebook access."
            ) from None
        return None
    return value.strip() if isinstance(value, str) else None


REDACTED = "[redacted]"
# Providers echo a masked key ("sk-ab****wxyz"): even masked, it leaks characters of the key.
_MASKED_KEY = re.compile(r"\S*\*{3,}\S*")


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every given secret, and any provider-masked key, replaced by ``[redacted]``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return _MASKED_KEY.sub(REDACTED, text)
