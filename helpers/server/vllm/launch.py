"""``dhllm serve --engine vllm [--replicas N]``: start vLLM and put dhllm's contract in front.

vLLM runs in its own venv (it pins its own torch, transformers and fastapi) as a subprocess on
an internal loopback port; dhllm's app speaks the chapter's ``POST /`` and ``/v1`` and relays
to it, or to vllm-router in front of N replicas. Stopping the app (or the engine) stops every
process it started: no orphan process, the ports are freed.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers.background_server import free_port
from helpers.chat import get_chat_model
from helpers.config import Settings
from helpers.hardware import detect_gpu
from helpers.models import ModelSpec, choose_precision, model_folder, resolve
from helpers.server.vllm.process import VLLMProcess, gpu_command
from helpers.server.vllm.relay import VLLMEngine
from helpers.server.vllm.replicas import ReplicaSet
from helpers.server.vllm.router import INSTALL_HINT as ROUTER_HINT
from helpers.server.vllm.router import find_router_python
from helpers.server.vllm.venv import VLLMError, find_vllm_python

REPLICA_RETRIES = 2  # a request that failed before its first token, tried on another replica

INSTALL_HINT = (
    "vLLM was not found. It lives in its own venv (it pins its own torch and transformers): "
    "`make vllm` here (CPU build, Linux x86-64, ~3.4 GB), or on a CUDA machine "
    "`python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm`; or point "
    "DHLLM_VLLM_PYTHON at a python that has it."
)


def vllm_precision(spec: ModelSpec | None, quantize: str | None = None) -> tuple[str, str | None]:
    """``(dtype, quantization)`` by the one rule ``load_model`` follows (``choose_precision``).

    vLLM quantizes with bitsandbytes at load time in 4-bit only
    (https://docs.vllm.ai/en/latest/features/quantization/bnb/), so 8-bit is refused here.
    """
    precision = choose_precision(spec, detect_gpu(), quantize)
    if precision.quantize == "8bit":
        raise VLLMError("vLLM quantizes with bitsandbytes in 4-bit only: set DHLLM_QUANTIZE=4bit, "
                        "or serve 8-bit with the builtin engine (--engine builtin)")
    return precision.dtype, "bitsandbytes" if precision.quantize else None


def start_vllm_engine(model_spec: str, settings: Settings, *,
                      progress: Callable[[str], None] | None = None) -> tuple[Any, VLLMEngine]:
    """Start vLLM on ``model_spec``; return ``(chat_model, engine)`` for ``create_app``.

    ``chat_model`` is an OpenAI-compatible client of that vLLM (usable on its own, too); the
    engine owns the processes and stops them when the app stops. ``settings.vllm_replicas``
    (``--replicas N``) > 1 starts N replicas behind vllm-router. With ``settings.vllm_url``
    (``DHLLM_VLLM_URL``) no vLLM is started: one URL is relayed to as is (a vLLM or a router
    that runs elsewhere), several get a router started in front of them. Served under the
    model's registry name (e.g. ``--served-model-name linly-7b``).
    """
    spec, _ = resolve(model_spec)
    served = spec.name if spec is not None else model_spec.rstrip("/").split("/")[-1]
    urls = [u.strip().rstrip("/") for u in (settings.vllm_url or "").split(",") if u.strip()]
    if len(urls) == 1:  # a vLLM (or a router) that runs elsewhere: relay only
        return _engine_for(model_spec, spec, served, urls[0] + "/v1", settings, process=None)
    python = find_vllm_python(settings.vllm_python)
    if urls:  # replicas elsewhere: only the router runs here
        process: VLLMProcess | ReplicaSet = ReplicaSet.remote(
            urls, _router_python(settings, python), policy=settings.vllm_policy)
    else:
        if python is None:
            raise VLLMError(INSTALL_HINT)
        process = _local_vllm(model_spec, spec, served, settings, python)
    process.start(timeout=settings.vllm_start_timeout, progress=progress)
    try:
        return _engine_for(model_spec, spec, served, process.base_url, settings, process)
    except BaseException:
        process.stop()
        raise


def _local_vllm(model_spec: str, spec: ModelSpec | None, served: str, settings: Settings,
                python: Path) -> VLLMProcess | ReplicaSet:
    """One vLLM, or ``settings.vllm_replicas`` of them behind a router (not started yet)."""
    source = model_folder(model_spec)  # vLLM loads a folder (registry names download first)
    dtype, quantization = vllm_precision(spec, settings.quantize)
    # usage.prompt_tokens_details.cached_tokens, as our own engine reports it (off by default).
    extra = ["--enable-prompt-tokens-details", *shlex.split(settings.vllm_args)]
    if quantization:
        extra += ["--quantization", quantization]
    if dtype != "float32":  # CUDA: the GPU build of vLLM; say how a learner gets it
        print("vLLM on CUDA, as a learner would set it up:\n"
              + gpu_command(source, served, dtype=dtype, quantization=quantization),
              file=sys.stderr)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(settings.vllm_kvcache_gb)}
    if settings.vllm_replicas > 1:
        return ReplicaSet.local(source, served, settings.vllm_replicas, python,
                                _router_python(settings, python), policy=settings.vllm_policy,
                                dtype=dtype, extra_args=extra, env=env)
    return VLLMProcess(source, served, free_port(), python, dtype=dtype, extra_args=extra,
                       env=env)


def _router_python(settings: Settings, vllm_python: Path | None) -> Path:
    """The Python that has vllm-router, or a VLLMError saying how to install it."""
    found = find_router_python(settings.vllm_router_python, beside=vllm_python)
    if found is None:
        raise VLLMError(ROUTER_HINT)
    return found


def _engine_for(model_spec: str, spec: ModelSpec | None, served: str, base_url: str,
                settings: Settings, process: VLLMProcess | ReplicaSet | None
                ) -> tuple[Any, VLLMEngine]:
    """The ChatModel (an OpenAI-compatible client of vLLM) and the relay engine."""
    chat_model = get_chat_model(f"vllm:{served}", base_url=base_url, name=model_spec)
    chat_model.prompt_format = spec.prompt_format if spec is not None else None
    # Behind a router another replica can take a failed request over; one vLLM cannot.
    retries = REPLICA_RETRIES if isinstance(process, ReplicaSet) else 0
    engine = VLLMEngine(chat_model, base_url, served, prompt_format=chat_model.prompt_format,
                        max_queue=settings.max_queue, process=process, retries=retries)
    return chat_model, engine
