"""The dhllm command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "helpers", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})


COMMANDS = {  # each command's own one-line help, as typer lists it
    ("chat",): "Chat with a model",
    ("serve",): "Serve a model",
    ("download",): "Download a model",
    ("bench",): "Throughput, first token / sentence",
    ("mirror", "serve"): "Serve DIR so",
    ("mirror", "add"): "Fill the mirror",
}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_its_own_help(command: tuple[str, ...]) -> None:
    # Each command's own help page (not the top-level text, which names them all anyway).
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"Usage: python -m helpers {' '.join(command)}" in " ".join(result.stdout.split())
    assert COMMANDS[command] in " ".join(result.stdout.split())


@pytest.mark.slow
def test_one_shot_chat_answers_on_the_embedded_model():
    result = run_cli("chat", "What is the capital of France?", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_chat_takes_its_answer_length_from_the_settings():
    question = ("chat", "What is the capital of France?", "--temperature", "0")
    result = run_cli(*question, DHLLM_DEFAULT_MAX_NEW_TOKENS="2")
    assert result.returncode == 0, result.stderr
    assert "Paris" not in result.stdout and 0 < len(result.stdout.split()) <= 2
    assert "Paris" in run_cli(*question, "--max-new-tokens", "8", DHLLM_DEFAULT_MAX_NEW_TOKENS="2").stdout


def test_bad_parameter_is_a_clear_error_not_a_traceback():
    result = run_cli("chat", "hi", "--temperature", "-1", "--model", "embedded")
    assert result.returncode == 2
    assert "temperature must be >= 0" in result.stderr and "Traceback" not in result.stderr
