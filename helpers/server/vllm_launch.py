"""``dhllm serve --engine vllm``: start vLLM on a model and put dhllm's contract in front of it.

vLLM runs in its own venv (it pins its own torch, transformers and fastapi) as a subprocess on
an internal loopback port; dhllm's app speaks the chapter's ``POST /`` and ``/v1`` and relays
to it. Stopping the app (or the engine) stops vLLM: no orphan process, the port is freed.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from typing import Any

from helpers.chat import get_chat_model
from helpers.config import Settings
from helpers.models import choose_placement, resolve
from helpers.server.vllm_engine import VLLMEngine
from helpers.server.vllm_process import VLLMError, VLLMProcess, find_vllm_python, gpu_command
from helpers.serving import free_port

INSTALL_HINT = (
    "vLLM was not found. It lives in its own venv (it pins its own torch and transformers): "
    "`make vllm` here (CPU build, Linux x86-64, ~3.4 GB), or on a CUDA machine "
    "`python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm`; or point "
    "DHLLM_VLLM_PYTHON at a python that has it."
)


def vllm_dtype(device: str = "auto") -> str:
    """The dtype ``load_model`` would pick, in vLLM's spelling (fp32 on CPU)."""
    placement = choose_placement(device)
    return str(placement.dtype).removeprefix("torch.")


def start_vllm_engine(model_spec: str, settings: Settings, *,
                      progress: Callable[[str], None] | None = None) -> tuple[Any, VLLMEngine]:
    """Start vLLM on ``model_spec``; return ``(chat_model, engine)`` for ``create_app``.

    ``chat_model`` is an OpenAI-compatible client of that vLLM (usable on its own, too); the
    engine owns the process and stops it when the app stops.
    """
    python = find_vllm_python(settings.vllm_python)
    if python is None:
        raise VLLMError(INSTALL_HINT)
    spec, source = resolve(model_spec)
    served = spec.name if spec is not None else model_spec.rstrip("/").split("/")[-1]
    dtype = vllm_dtype()
    if dtype != "float32" and spec is not None:
        print(f"on CUDA vLLM's GPU build is used, e.g.:\n{gpu_command(source, served)}",
              file=sys.stderr)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(settings.vllm_kvcache_gb)}
    process = VLLMProcess(source, served, free_port(), python, dtype=dtype,
                          extra_args=shlex.split(settings.vllm_args), env=env)
    process.start(timeout=settings.vllm_start_timeout, progress=progress)
    try:
        chat_model = get_chat_model(f"vllm:{served}", base_url=process.base_url,
                                    name=model_spec)
        chat_model.prompt_format = spec.prompt_format if spec is not None else None
        engine = VLLMEngine(chat_model, process.base_url, served,
                            prompt_format=chat_model.prompt_format,
                            max_queue=settings.max_queue, process=process)
    except BaseException:
        process.stop()
        raise
    return chat_model, engine
