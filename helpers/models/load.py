"""Loading a model: the folder it comes from (downloaded first if need be), then ``from_pretrained``.

Runs the cheap part of ``hub.verify`` before it loads a local folder, so a learner never meets
"invalid load key" from a git-lfs pointer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from helpers.embedded import embedded_model_dir
from helpers.hub import DownloadError, download, verify
from helpers.hub.locate import find_hub
from helpers.models.choice import (
    GPU_EXTRA,
    ModelChoice,
    QuantizationError,
    choose_placement,
    local_model_dir,
    quantization_config,
)
from helpers.models.registry import REGISTRY, check_remote_code_support, hub_id, resolve

ModelRef = str | os.PathLike[str] | ModelChoice  # a registry name, hub id, folder or a choice


def model_folder(name_or_choice: ModelRef, endpoint: str | None = None,
                 progress: bool = True) -> str:
    """What ``from_pretrained`` gets: a local folder (downloaded first for registry names)."""
    choice = name_or_choice if isinstance(name_or_choice, ModelChoice) else None
    if choice is not None and choice.path:
        return choice.path
    spec = REGISTRY.get(str(name_or_choice))
    if spec is None:
        return str(name_or_choice)  # a folder, or a hub id for from_pretrained
    if spec.name == "embedded":
        return str(embedded_model_dir())
    local = local_model_dir(spec.name)
    if local is not None:
        return str(local)
    if endpoint:
        hub: tuple[str, str] | None = ("hf", endpoint)
    elif choice is not None and choice.source and choice.endpoint:
        hub = (choice.source, choice.endpoint)
    else:
        hub = find_hub()
    if hub is None or (hub[0] == "modelscope" and not spec.modelscope_id):
        raise DownloadError(
            f"{spec.name} ({spec.hf_id}) is not on this machine (no models/"
            f"{(spec.hf_id or '').split('/')[-1]}) and no hub answers. Download it where you are "
            f"online: dhllm download {spec.hf_id} --source hf-mirror, or set HF_ENDPOINT to a mirror."
        )
    source, url = hub
    return str(download(hub_id(spec.name, source), source=source, endpoint=url,  # type: ignore[arg-type]
                        progress=progress))


def _bitsandbytes_config(kwargs: dict[str, Any]) -> Any:
    """A ``BitsAndBytesConfig``, or QuantizationError when bitsandbytes is not installed."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(f"4-bit/8-bit loading needs bitsandbytes: {GPU_EXTRA}")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)


def load_model(
    name_or_path: ModelRef,
    device: str = "auto",
    dtype: str = "auto",
    verbose: bool = True,
    quantize: str | None = None,
    endpoint: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` by registry name, ``ModelChoice``, hub id or local folder.

    A ``ModelChoice`` brings its device, dtype and quantization (explicit arguments win).
    Registry names load from a local folder (``local_model_dir``) or are downloaded first, from
    ``endpoint``, else the first hub that answers. ``quantize``: "4bit"/"8bit" (CUDA only).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(name_or_path, ModelChoice):
        device = name_or_path.device if device == "auto" else device
        dtype = name_or_path.dtype if dtype == "auto" else dtype
        quantize = quantize or name_or_path.quantize
    spec, name = resolve(name_or_path)
    trust_remote_code = bool(spec and spec.trust_remote_code)
    if spec is not None:
        check_remote_code_support(spec)
    placement = choose_placement(device, dtype)
    bnb_kwargs = quantization_config(quantize, placement)  # fails before any download
    bnb = _bitsandbytes_config(bnb_kwargs) if bnb_kwargs else None
    source = model_folder(name_or_path, endpoint=endpoint, progress=verbose)
    if Path(source).is_dir():
        verify(Path(source), quick=True)  # git-lfs pointers, missing weights: fail here, clearly
    if verbose:
        how = f", {quantize}" if quantize else ""
        print(f"正在加载 {name}：来自 {source}，{placement.reason}{how}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    # On CUDA, load straight onto the GPU: Colab has ~12 GB of RAM, less than a 7B model in bf16.
    on_cuda = placement.device.startswith("cuda")
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=placement.dtype,
        trust_remote_code=trust_remote_code,
        device_map=placement.device if on_cuda else None,
        quantization_config=bnb,
    )
    if not on_cuda:
        model.to(placement.device)
    model.eval()
    return model, tokenizer
