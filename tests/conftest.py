"""Shared fixtures: tiny random models built offline in well under a second, the embedded model,
and free ports. Servers started by tests bind 127.0.0.1 only."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The converted embedded SmolLM2 (converted once per machine, then cached)."""
    from helpers.embedded import embedded_model_dir

    return embedded_model_dir()


def build_tiny_model(target: Path, tokenizer_dir: Path, arch: str = "qwen2", seed: int = 0) -> Path:
    """A 2-layer random Qwen2 or Llama (3.2 M params) with SmolLM2's tokenizer, saved to target."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> Path:
    """A tiny random Qwen2 with a chat template, saved as safetensors + tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), embedded_dir, "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> Path:
    """A tiny random Llama (the architecture of Linly-7B)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), embedded_dir, "llama")


@pytest.fixture(scope="session")
def tiny_chat(tiny_model_dir: Path):
    """TransformersChat over the tiny Qwen2, chat-template format."""
    from helpers.chat import TransformersChat

    return TransformersChat.load(str(tiny_model_dir), verbose=False)


@pytest.fixture(scope="session")
def embedded_chat():
    """TransformersChat over the real embedded SmolLM2-135M-Instruct."""
    from helpers.chat import TransformersChat

    return TransformersChat.load("embedded", verbose=False)
