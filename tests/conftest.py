"""Shared fixtures: tiny random models built offline in well under a second, the embedded model,
and free ports. Servers started by tests bind 127.0.0.1 only."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.background_server import free_port
from helpers.stand_in import build_tiny_model

__all__ = ["free_port"]  # tests import it from here


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The converted embedded SmolLM2 (converted once per machine, then cached)."""
    from helpers.embedded import embedded_model_dir

    return embedded_model_dir()


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
