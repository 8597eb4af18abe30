"""What runs where: placement, precision (one rule for both engines) and ``choose_model``.

``choose_precision`` is the one precision rule: ``load_model`` and the vLLM launcher both follow
it. ``choose_model`` adds the registry's fallbacks and says, in one sentence, what it picked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.config import get_settings
from helpers.hardware import Gpu, compute_dtype, detect_gpu, estimate_gib
from helpers.hub.locate import find_hub, local_copy
from helpers.models.registry import REGISTRY, ModelSpec, get_spec


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
        return Placement(device, getattr(torch, dtype), f"{device}, {dtype}（按你的设置）")
    if device.startswith("cuda"):
        chosen = compute_dtype(tuple(torch.cuda.get_device_capability(device)))
        name = torch.cuda.get_device_name(device)
        why = "" if chosen == "bfloat16" else "（这块 GPU 没有原生 bf16）"
        return Placement(device, getattr(torch, chosen), f"{name}: cuda, {chosen}{why}")
    return Placement(device, torch.float32, "没有 CUDA：cpu, float32")


# ---------------------------------------------------------------- precision: the one rule

QUANTIZE_VALUES = (None, "none", "4bit", "8bit")  # DHLLM_QUANTIZE: unset, 16-bit, 4-bit, 8-bit


@dataclass(frozen=True)
class Precision:
    """How a model runs: device, compute dtype, quantization and the memory that takes."""

    device: str  # "cuda" or "cpu"
    dtype: str  # compute dtype: "bfloat16", "float16" or "float32"
    quantize: str | None  # "4bit", "8bit" or None (weights in ``dtype``)
    need_gib: float | None  # estimated GPU memory (RAM on CPU); None for a model of unknown size
    fits: bool  # False: even the smallest precision allowed needs more than the GPU has


def precision_ladder(quantize: str | None) -> list[str | None]:
    """Quantizations to try, best first: 16-bit then 4-bit when unset; else only the one asked."""
    if quantize not in QUANTIZE_VALUES:
        raise ValueError(f"quantize must be '4bit', '8bit', 'none' or unset, not {quantize!r}")
    if quantize is None:
        # 4-bit rather than 8-bit: LLM.int8() is much slower than 16-bit, while bitsandbytes has
        # batch-1 NF4 kernels (0.40 release notes); and 4-bit leaves room for context (a 12 GiB
        # card keeps ~6 GiB free: ~12k tokens of Linly's KV cache, or several chats served at once).
        return [None, "4bit"]
    return [None if quantize == "none" else quantize]


def choose_precision(spec: ModelSpec | None, gpu: Gpu | None,
                     quantize: str | None = None) -> Precision:
    """The precision rule both engines follow, from the GPU, the model's size and DHLLM_QUANTIZE.

    No GPU: float32 on the CPU (bitsandbytes needs CUDA, so ``quantize`` is ignored; RAM is not
    checked). A GPU: its 16-bit dtype (bf16 from Ampere on, fp16 before) at the first precision
    of ``precision_ladder(quantize)`` that fits its memory; when none fits, the smallest one with
    ``fits=False``. A model of unknown size (a folder, a hub id): 16-bit, or the 4/8-bit asked for.
    """
    ladder = precision_ladder(quantize)
    if gpu is None:
        need = estimate_gib(spec.params_b, spec.kv_kib_per_token, "float32") if spec else None
        return Precision("cpu", "float32", None, need, True)
    if spec is None:
        return Precision("cuda", gpu.dtype, quantize if quantize in ("4bit", "8bit") else None,
                         None, True)
    for q in ladder:
        need = estimate_gib(spec.params_b, spec.kv_kib_per_token, q or gpu.dtype)
        if need <= gpu.memory_gib:
            return Precision("cuda", gpu.dtype, q, need, True)
    return Precision("cuda", gpu.dtype, ladder[-1], need, False)


# ---------------------------------------------------------------- quantization

GPU_EXTRA = 'pip install "dhllm[gpu]"  (bitsandbytes>=0.43)'


class QuantizationError(RuntimeError):
    """4-bit/8-bit loading is impossible here; the message says why and what to install."""


def quantization_config(quantize: str | None, placement: Placement) -> dict[str, Any] | None:
    """The ``BitsAndBytesConfig`` keyword arguments for ``quantize`` (None: no quantization)."""
    if quantize is None:
        return None
    if quantize not in ("4bit", "8bit"):
        raise ValueError(f"quantize must be '4bit', '8bit' or None, not {quantize!r}")
    if not placement.device.startswith("cuda"):
        raise QuantizationError(
            f"quantize={quantize!r} needs a CUDA GPU (bitsandbytes quantizes on the GPU), and this "
            f"runs on {placement.device}. Load without quantize here, or on a GPU machine run "
            f"{GPU_EXTRA}."
        )
    if quantize == "8bit":
        return {"load_in_8bit": True}
    # NF4 with double quantization (QLoRA's recipe): ~0.5 byte per weight at close to 16-bit
    # quality; compute in the GPU's 16-bit dtype (bf16 from Ampere on, fp16 on a T4).
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": placement.dtype,
        "bnb_4bit_use_double_quant": True,
    }


# ---------------------------------------------------------------- choosing a model

GPU_FALLBACKS = ("qwen2.5-1.5b-instruct", "qwen2.5-0.5b-instruct")  # smaller Chinese models
CPU_MODEL = "qwen2.5-0.5b-instruct"  # the largest registry model we send to a CPU
OVERRIDE_HINT = "设置 DHLLM_MODEL / DHLLM_QUANTIZE 可以改。"


@dataclass(frozen=True)
class ModelChoice:
    """The model the notebooks will load, how, and why; ``str(choice)`` is its name."""

    name: str
    device: str  # "cuda" or "cpu"
    dtype: str  # compute dtype: "bfloat16", "float16" or "float32"
    quantize: str | None = None  # "4bit", "8bit" or None
    estimated_gib: float | None = None  # GPU memory (RAM on CPU); None when unknown
    path: str | None = None  # a local folder to load instead of downloading
    source: str | None = None  # the hub to download from ("hf", "hf-mirror", "modelscope")
    endpoint: str | None = None
    message: str = ""

    def __str__(self) -> str:
        return self.name

    @property
    def precision(self) -> str:
        """``4bit``/``8bit`` when quantized, else the dtype."""
        return self.quantize or self.dtype

    def summary(self) -> str:
        """One line: ``linly-7b, float16, 约 14.3 GiB 显存``."""
        where = "显存" if self.device.startswith("cuda") else "内存"
        size = f", 约 {self.estimated_gib:.1f} GiB {where}" if self.estimated_gib else f", {self.device}"
        return f"{self.name}, {self.precision}{size}"


def local_model_dir(name: str) -> Path | None:
    """A downloaded folder for registry ``name`` that passes a quick verify, or None.

    Looks in ``models/<name part of the hub id>`` (relative to the working directory, as the
    chapter's ``--local-dir``), then in ``<cache_dir>/downloads/<org>/<name>``.
    """
    spec = get_spec(name)
    ids = [i for i in (spec.hf_id, spec.modelscope_id) if i]
    if spec.name == "embedded" or not ids:
        return None
    return local_copy(ids)


class _Hub:
    """Probes the hubs at most once, and only when a model has to come from one."""

    def __init__(self, online: bool | None) -> None:
        self.online = online
        self.found: tuple[str, str] | None = None
        self.probed = False

    def get(self) -> tuple[str, str] | None:
        if not self.probed:
            self.found, self.probed = find_hub(self.online), True
        return self.found


Where = tuple[str | None, str | None, str | None]  # (local folder, source, endpoint)


def _where(name: str, hub: _Hub) -> Where | None:
    """Where registry model ``name`` would come from, or None (not on disk, no hub)."""
    if name == "embedded":
        return None, None, None
    local = local_model_dir(name)
    if local is not None:
        return str(local), None, None
    found = hub.get()
    if found is None or (found[0] == "modelscope" and not get_spec(name).modelscope_id):
        return None
    return None, *found


def _from_text(where: Where) -> str:
    path, _, endpoint = where
    if path:
        return f"从本地文件夹 {path} 加载"
    return f"从 {endpoint} 下载" if endpoint else "已内置，不用下载"


def _precision_text(quantize: str | None, dtype: str) -> str:
    return {"4bit": "4-bit（nf4）量化", "8bit": "8-bit 量化"}.get(quantize or "", dtype)


def _choice(name: str, precision: Precision, where: Where, lead: str) -> ModelChoice:
    """A ModelChoice whose message reads ``{lead}使用 NAME（HF id），精度，约 X GiB，来源。``."""
    p = precision
    memory = "" if p.device == "cuda" else " 内存"
    need = p.need_gib or 0.0  # a registry model: always estimated
    message = (f"{lead}使用 {name}（{get_spec(name).hf_id}），{_precision_text(p.quantize, p.dtype)}，"
               f"约 {need:.1f} GiB{memory}，{_from_text(where)}。{OVERRIDE_HINT}")
    return ModelChoice(name, p.device, p.dtype, p.quantize, round(need, 2), *where, message=message)


def _gpu_choice(preferred: str, gpu: Gpu, quantize: str | None, hub: _Hub) -> ModelChoice | None:
    """``preferred`` at the best precision that fits, else a smaller Chinese model that fits."""
    spec = get_spec(preferred)
    names = [preferred, *(n for n in GPU_FALLBACKS if get_spec(n).params_b < spec.params_b)]
    skipped = ""  # why ``preferred`` was passed over, for the message
    for name in names:
        precision = choose_precision(get_spec(name), gpu, quantize)
        where = _where(name, hub) if precision.fits else None
        if where is None:
            if name == preferred:
                skipped = (f"{name} 不在本机，也连不上模型托管平台；" if precision.fits
                           else f"{name} 最少也要约 {precision.need_gib:.1f} GiB，放不下；")
            continue
        lead = f"GPU {gpu.describe()}：{skipped}"
        if precision.quantize is not None and quantize is None:
            full = choose_precision(get_spec(name), gpu, "none").need_gib
            lead += f"{name} 的 {gpu.dtype} 约需 {full:.1f} GiB，放不下；"
        return _choice(name, precision, where, lead)
    return None


def _cpu_choice(preferred: str, fallback: str, why: str, hub: _Hub) -> ModelChoice:
    """Without a usable GPU: a small Chinese model from disk or a hub, else the embedded stand-in."""
    spec = REGISTRY.get(preferred)
    small = spec is not None and spec.params_b <= get_spec(CPU_MODEL).params_b
    name = preferred if small else CPU_MODEL
    where = _where(name, hub)
    if where is not None:
        lead = f"{why}：" if small else f"{why}，{preferred} 在 CPU 上太大，换一个会说中文的小模型："
        return _choice(name, choose_precision(get_spec(name), None), where, lead)
    fb = get_spec(fallback)
    need = choose_precision(fb, None).need_gib
    message = (
        f"{why}，也没有连上模型托管平台（离线）：使用内置的替代模型 {fallback}（{fb.hf_id}），它只会英文，"
        f"中文回答没有意义，不是 {preferred}。联网（或把模型下载到 models/）后重新运行本单元，会换成"
        f"会说中文的模型。"
        f"{OVERRIDE_HINT}"
    )
    return ModelChoice(fallback, "cpu", "float32", None, round(need or 0, 2), message=message)


def _forced_choice(model: str, gpu: Gpu | None, quantize: str | None, hub: _Hub) -> ModelChoice:
    """``DHLLM_MODEL``: exactly that model, at the best precision that fits (no fallback)."""
    lead = f"DHLLM_MODEL={model}：按你的设置，"
    spec = REGISTRY.get(model)
    precision = choose_precision(spec, gpu, quantize)
    if spec is None:  # a folder or a hub id: nothing to estimate
        p = precision
        path = model if Path(model).expanduser().is_dir() else None
        message = f"{lead}{p.device}，{_precision_text(p.quantize, p.dtype)}。{OVERRIDE_HINT}"
        return ModelChoice(model, p.device, p.dtype, p.quantize, None, path, message=message)
    where = _where(model, hub) or (None, None, None)  # load_model says what is missing
    if not precision.fits:
        lead += f"GPU {gpu.describe()} 可能放不下，"  # type: ignore[union-attr]
    return _choice(model, precision, where, lead)


def plan_model(preferred: str, fallback: str = "embedded", online: bool | None = None) -> ModelChoice:
    """What ``choose_model`` picks, without printing (``describe_environment`` uses it too)."""
    settings = get_settings()
    quantize = settings.quantize
    gpu = detect_gpu()
    hub = _Hub(online)
    if "model" in settings.model_fields_set and settings.model:  # set by the user
        return _forced_choice(settings.model, gpu, quantize, hub)
    if preferred not in REGISTRY:
        return _forced_choice(preferred, gpu, quantize, hub)
    if gpu is not None:
        found = _gpu_choice(preferred, gpu, quantize, hub)
        if found is not None:
            return found
        offline = hub.probed and hub.found is None
        why = (f"有 GPU {gpu.describe()}，但 {preferred} 不在本机" if offline
               else f"GPU {gpu.describe()}太小，哪个模型都装不下")
    else:
        why = "没有 CUDA GPU"
    if quantize in ("4bit", "8bit"):
        why += f"（DHLLM_QUANTIZE={quantize} 需要 CUDA GPU，这里不用）"
    return _cpu_choice(preferred, fallback, why, hub)


def choose_model(
    preferred: str, fallback: str = "embedded", online: bool | None = None, verbose: bool = True
) -> ModelChoice:
    """Pick the model this machine can run and say why (once); pass the result to ``load_model``.

    With CUDA: ``preferred`` in bf16 (fp16 before Ampere) if it fits, else 4-bit, else a smaller
    Chinese Qwen2.5. Without: Qwen2.5-0.5B on the CPU when a hub (or a local folder) has it,
    else the embedded English-only stand-in. ``DHLLM_MODEL`` / ``DHLLM_QUANTIZE`` override.
    ``online``: None probes the hubs, True/False skips the probe (tests).
    """
    choice = plan_model(preferred, fallback, online)
    if verbose:
        print(choice.message)
    return choice


def describe_environment(preferred: str = "linly-7b", online: bool | None = None) -> str:
    """Two lines for the setup cell: versions and device, then what ``choose_model`` will pick."""
    import platform

    import torch
    import transformers

    gpu = detect_gpu()
    device = f"CUDA：{gpu.describe()}" if gpu else "只有 CPU（没有 CUDA GPU）"
    choice = plan_model(preferred, online=online)
    return (
        f"Python {platform.python_version()} | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | {device}\n"
        f"choose_model({preferred!r}) 选择 -> {choice.summary()}"
    )
