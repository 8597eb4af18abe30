"""The dhllm command line."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "helpers", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ["chat", "serve", "download", "mirror", "bench"]:
        assert command in result.stdout
    mirror = run_cli("mirror", "--help")
    assert mirror.returncode == 0 and "serve" in mirror.stdout and "add" in mirror.stdout


@pytest.mark.slow
def test_one_shot_chat_answers_on_the_embedded_model():
    result = run_cli("chat", "What is the capital of France?", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_bad_parameter_is_a_clear_error_not_a_traceback():
    result = run_cli("chat", "hi", "--temperature", "-1", "--model", "embedded")
    assert result.returncode == 2
    assert "temperature must be >= 0" in result.stderr and "Traceback" not in result.stderr
