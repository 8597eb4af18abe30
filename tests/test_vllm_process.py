"""vLLM's command lines: the one we start and the one a learner runs on a GPU are the same argv.

Starting vLLM itself is tested in ``test_vllm.py`` (one server) and ``test_vllm_replicas.py``
(two replicas behind vllm-router); both skip where vLLM is not installed.
"""

from __future__ import annotations

import shlex

import pytest

from helpers.server.vllm.process import VLLMProcess, cpu_range, gpu_command


def test_gpu_command_names_dtype_and_quantization() -> None:
    cmd = gpu_command("/m/linly", "linly", dtype="float16", quantization="bitsandbytes")
    assert "pip install vllm bitsandbytes" in cmd
    assert "--dtype float16" in cmd and "--quantization bitsandbytes" in cmd
    assert "--host 127.0.0.1" in cmd
    with pytest.raises(ValueError):
        gpu_command("/m", dtype="float32")


def test_the_gpu_command_is_the_argv_we_start() -> None:
    served = VLLMProcess("/m/linly", "linly", 8000, ".venv-vllm/bin/python", dtype="float16",
                         max_model_len=4096, extra_args=["--quantization", "bitsandbytes"])
    printed = gpu_command("/m/linly", "linly", dtype="float16", quantization="bitsandbytes",
                          install=False)
    assert shlex.split(printed) == served.command()


@pytest.mark.parametrize(("cpus", "expected"), [
    ([0], "0"), ([0, 1], "0-1"), ([0, 2, 3], "0,2-3"), ([4, 5, 6, 9], "4-6,9"),
])
def test_cpu_ranges_as_vllm_wants_them(cpus: list[int], expected: str) -> None:
    assert cpu_range(cpus) == expected
