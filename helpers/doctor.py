"""``dhllm doctor``: what on this machine would trip up the notebooks, each with its fix.

Every check returns ``Finding``s: ``ok``, a ``note`` (worth knowing, nothing to fix) or a
``problem`` (something will fail or run far slower than it should, with the command that fixes
it), in Chinese and English. ``dhllm doctor`` prints them all and exits 1 when there is a problem;
``print_problems()`` (the notebooks' setup cell) prints one line per problem and nothing else.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from helpers.config import NOTEBOOK_PORTS, get_settings
from helpers.hardware import Gpu

Level = Literal["ok", "note", "problem"]

TORCH_SELECTOR = "https://pytorch.org/get-started/locally/"
# cu126 runs on any driver for CUDA 12.x (minor-version compatibility); pytorch.org lists the
# current choices (cu126, cu128, cu130, ...).
CUDA_TORCH = "pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu126"
NO_PROXY_FIX = ('export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost  '
                '（PowerShell：$env:NO_PROXY="127.0.0.1,localhost"；notebook 里：'
                'os.environ["NO_PROXY"] = "127.0.0.1,localhost"）')
HUB_TIMEOUT = 1.5  # seconds per hub, probed in parallel: a blocked hub costs one timeout
DISK_HEADROOM = 1.1  # downloads need their size plus partial files and conversions


@dataclass(frozen=True)
class Finding:
    """One result: which check, how bad, what it means (中文 / English) and the fix."""

    check: str
    level: Level
    zh: str
    en: str
    fix: str = ""

    def line(self) -> str:
        """One line: ``[check] 中文 / English 修复：...``."""
        fix = f"  修复：{self.fix}" if self.fix else ""
        return f"[{self.check}] {self.zh} / {self.en}{fix}"


def _ok(check: str, zh: str, en: str) -> Finding:
    return Finding(check, "ok", zh, en)


# ---------------------------------------------------------------- Python and torch


def check_python(version: tuple[int, ...] | None = None, requires: str | None = None) -> Finding:
    """The running Python against the project's ``requires-python``."""
    from packaging.specifiers import SpecifierSet

    version = version or sys.version_info[:3]
    if requires is None:
        try:
            requires = importlib.metadata.metadata("dhllm")["Requires-Python"] or ">=3.11"
        except importlib.metadata.PackageNotFoundError:  # a bare checkout on PYTHONPATH
            requires = ">=3.11"
    shown = ".".join(map(str, version))
    if shown in SpecifierSet(requires):
        return _ok("python", f"Python {shown}", f"Python {shown}")
    return Finding("python", "problem", f"Python {shown} 不满足 {requires}",
                   f"Python {shown} does not satisfy {requires}",
                   "安装 Python 3.11 或 3.12（python.org，或者 conda：conda env create -f "
                   "environment.yml），然后重建 .venv")


@dataclass(frozen=True)
class Smi:
    """What ``nvidia-smi`` reports: the GPUs (name, MiB) and the newest CUDA its driver runs."""

    gpus: list[tuple[str, float]]
    driver_cuda: str | None


def nvidia_smi(timeout: float = 10.0) -> Smi | None:
    """``nvidia-smi``'s GPUs, or None when it is not on PATH (no NVIDIA driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        query = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=timeout)
        header = subprocess.run([exe], capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.TimeoutExpired):
        return Smi([], None)
    gpus = []
    for row in query.stdout.splitlines() if query.returncode == 0 else []:
        name, _, mib = row.rpartition(",")
        if name and mib.strip().replace(".", "", 1).isdigit():
            gpus.append((name.strip(), float(mib)))
    found = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return Smi(gpus, found.group(1) if found else None)


@dataclass(frozen=True)
class TorchBuild:
    """The installed torch: version, the CUDA it was built for (None: CPU build), CUDA usable."""

    version: str
    cuda: str | None
    available: bool
    gpu: Gpu | None = None


def torch_build() -> TorchBuild | None:
    """What the installed torch is, or None when torch is missing."""
    try:
        import torch
    except ImportError:
        return None
    from helpers.hardware import detect_gpu

    available = bool(torch.cuda.is_available())
    return TorchBuild(str(torch.__version__), torch.version.cuda, available,
                      detect_gpu() if available else None)


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def check_torch(build: TorchBuild | None, smi: Smi | None) -> Finding:
    """The torch build (CPU or CUDA) against the NVIDIA GPU that is present."""
    if build is None:
        return Finding("torch", "problem", "没有安装 torch", "torch is not installed",
                       f'pip install -e ".[dev]"（有 GPU 时用 {TORCH_SELECTOR} 给出的命令）')
    gpus = smi.gpus if smi else []
    if build.available:
        name = build.gpu.name if build.gpu else "?"
        return _ok("torch", f"torch {build.version}（CUDA {build.cuda}）能用 GPU {name}",
                   f"torch {build.version} (CUDA {build.cuda}) sees {name}")
    if build.cuda is None and gpus:
        return Finding("torch", "problem",
                       f"有 NVIDIA GPU（{gpus[0][0]}），但 torch {build.version} 是 CPU 版，用不了 GPU",
                       f"an NVIDIA GPU ({gpus[0][0]}) is present but torch {build.version} is a "
                       f"CPU build and cannot use it",
                       f"{CUDA_TORCH}（当前可选的版本见 {TORCH_SELECTOR}）")
    if build.cuda and gpus:
        driver = smi.driver_cuda if smi else None
        if driver and _major_minor(driver) < _major_minor(build.cuda):
            zh = f"显卡驱动只支持到 CUDA {driver}，而 torch {build.version} 需要 CUDA {build.cuda}"
            en = f"the driver supports CUDA {driver} at most; torch {build.version} needs {build.cuda}"
        else:
            zh = f"torch {build.version}（CUDA {build.cuda}）看不到 GPU {gpus[0][0]}"
            en = f"torch {build.version} (CUDA {build.cuda}) cannot see the GPU {gpus[0][0]}"
        return Finding("torch", "problem", zh, en,
                       f"更新 NVIDIA 驱动，或者安装为较老 CUDA 构建的 torch：{CUDA_TORCH}；"
                       f"再检查 CUDA_VISIBLE_DEVICES 不是空的")
    if smi is not None and not gpus:
        return Finding("torch", "problem", "nvidia-smi 在，但没有列出 GPU（驱动出错？）",
                       "nvidia-smi is there but lists no GPU (a driver problem?)",
                       "运行 nvidia-smi 看它报什么错；重装或更新 NVIDIA 驱动")
    kind = f"CUDA {build.cuda} 版" if build.cuda else "CPU 版"
    return _ok("torch", f"没有 NVIDIA GPU，torch {build.version}（{kind}）在 CPU 上运行",
               f"no NVIDIA GPU: torch {build.version} runs on the CPU")


# ---------------------------------------------------------------- the GPU and Linly-7B


def check_gpu_memory(gpu: Gpu | None, bitsandbytes: bool | None = None) -> list[Finding]:
    """What the GPU means for the chapter's Linly-7B, by ``choose_precision`` (the loaders' rule)."""
    from helpers.models import choose_precision, get_spec

    if gpu is None:
        return [Finding("gpu", "note", "没有 CUDA GPU：notebook 用 CPU 上的小模型（Qwen2.5-0.5B，离线时用内置的替代模型）",
                        "no CUDA GPU: the notebooks use a small CPU model (Qwen2.5-0.5B, or the "
                        "embedded stand-in offline); Linly-7B needs a GPU such as Colab's T4")]
    spec = get_spec("linly-7b")
    chosen = choose_precision(spec, gpu, get_settings().quantize)
    need = chosen.need_gib or 0.0
    shown = f"{gpu.name}（{gpu.memory_gib:.1f} GiB）"
    if not chosen.fits:
        return [Finding("gpu", "note",
                        f"{shown}：Linly-7B 即使 {chosen.quantize or '16 位'} 也要约 {need:.1f} GiB，放不下；"
                        f"notebook 会换成更小的 Qwen2.5",
                        f"{shown}: Linly-7B needs ~{need:.1f} GiB even in "
                        f"{chosen.quantize or '16-bit'}; the notebooks use a smaller Qwen2.5 (for "
                        f"Linly-7B use a Colab T4)")]
    margin = gpu.memory_gib - need
    if chosen.quantize is None:
        tight = f"，余量很小（只剩约 {margin:.1f} GiB）" if margin < 1 else ""
        return [Finding("gpu", "ok" if margin >= 1 else "note",
                        f"{shown}：Linly-7B 可以用 16 位加载（约 {need:.1f} GiB，含 2k token 的 KV 缓存）{tight}",
                        f"{shown}: Linly-7B fits in 16-bit (~{need:.1f} GiB incl. a 2k-token KV "
                        f"cache), {margin:.1f} GiB to spare")]
    found = [Finding("gpu", "note",
                     f"{shown}：Linly-7B 会用 {chosen.quantize} 加载（约 {need:.1f} GiB）",
                     f"{shown}: Linly-7B will load in {chosen.quantize} (~{need:.1f} GiB)")]
    if bitsandbytes is None:
        bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    if not bitsandbytes:
        found.append(Finding("bitsandbytes", "problem",
                             f"{chosen.quantize} 加载需要 bitsandbytes，但没有安装",
                             f"{chosen.quantize} loading needs bitsandbytes, which is not installed",
                             'pip install "bitsandbytes>=0.43"（在本地克隆的仓库里：pip install -e ".[gpu]"）'))
    return found


# ---------------------------------------------------------------- disk


def download_bytes(name: str) -> float:
    """Bytes a registry model downloads: its 16-bit weights (Linly-7B ~13.6 GB)."""
    from helpers.models import get_spec

    return 0.0 if name == "embedded" else get_spec(name).params_b * 1e9 * 2


def check_disk(folder: Path, need_bytes: float, model: str) -> Finding:
    """Free space where downloads go, against what ``model`` needs."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    where = f"{folder}（剩 {free / 1e9:.1f} GB）"
    if need_bytes == 0:
        return _ok("disk", f"{model} 不用下载；{where}", f"{model} needs no download; {free / 1e9:.1f} GB free")
    if free >= need_bytes * DISK_HEADROOM:
        return _ok("disk", f"{model} 约 {need_bytes / 1e9:.1f} GB，放得下：{where}",
                   f"{model} (~{need_bytes / 1e9:.1f} GB) fits: {free / 1e9:.1f} GB free at {folder}")
    return Finding("disk", "problem",
                   f"{model} 要下载约 {need_bytes / 1e9:.1f} GB，{where}不够",
                   f"{model} downloads ~{need_bytes / 1e9:.1f} GB but only {free / 1e9:.1f} GB is "
                   f"free at {folder}",
                   "腾出空间，或者把下载放到更大的磁盘上：DHLLM_CACHE_DIR=/big/disk"
                   "（Colab：Google Drive 上的一个文件夹）")


def check_chosen_model_disk(online: bool) -> Finding:
    """``check_disk`` for the model ``choose_model('linly-7b')`` would pick here.

    ``online``: whether a hub can be reached (known already: no second probe). Online, the
    choice is the model that would be downloaded, the one whose size matters.
    """
    from helpers.models import choose_model

    choice = choose_model("linly-7b", online=online, verbose=False)
    need = 0.0 if choice.path else download_bytes(choice.name)
    return check_disk(get_settings().resolved_cache_dir(), need, choice.name)


# ---------------------------------------------------------------- network: proxies and hubs


def check_proxies(url: str = "http://127.0.0.1:7871") -> Finding:
    """Proxy variables (any case) that would send requests for 127.0.0.1 to the proxy."""
    import requests.utils

    names = sorted(k for k in os.environ if k.lower() in ("http_proxy", "https_proxy", "all_proxy"))
    if not names:
        return _ok("proxy", "没有设置代理", "no proxy variables set")
    # requests' own rule: the scheme's proxy (or all_proxy) unless NO_PROXY / no_proxy excludes
    # the host; httpx (the OpenAI SDK) follows the same variables.
    proxies = requests.utils.get_environ_proxies(url, no_proxy=None)
    if requests.utils.select_proxy(url, proxies) is None:
        return _ok("proxy", f"设置了 {', '.join(names)}，但不会用于 {url}（NO_PROXY 或协议不同）",
                   f"{', '.join(names)} set, but none applies to {url} (NO_PROXY, or another scheme)")
    return Finding("proxy", "problem",
                   f"{', '.join(names)} 会把发往 {url} 的请求也交给代理（502 或超时）",
                   f"{', '.join(names)} would send requests for {url} through the proxy "
                   f"(502 or a timeout)", NO_PROXY_FIX)


def _offline() -> bool:
    return get_settings().offline_mode()


def default_hubs() -> list[tuple[str, str]]:
    """``(label, url)`` of the hubs the notebooks use; ``HF_ENDPOINT`` replaces huggingface.co."""
    from helpers.hub import HF_ENDPOINT, HF_MIRROR_ENDPOINT, MODELSCOPE_ENDPOINT

    custom = get_settings().hf_endpoint
    first = ("HF_ENDPOINT", custom.rstrip("/")) if custom else ("Hugging Face", HF_ENDPOINT)
    modelscope = os.environ.get("MODELSCOPE_ENDPOINT", MODELSCOPE_ENDPOINT).rstrip("/")
    hubs = [first, ("hf-mirror", HF_MIRROR_ENDPOINT), ("ModelScope", modelscope)]
    return list(dict.fromkeys(hubs))


def check_hubs(hubs: list[tuple[str, str]] | None = None, timeout: float = HUB_TIMEOUT) -> list[Finding]:
    """Which hubs answer (in parallel, short timeouts); none when offline is set."""
    from helpers.hub import hub_reachable

    if _offline():
        return [Finding("hubs", "note", "已设置离线（DHLLM_OFFLINE / HF_HUB_OFFLINE），不检查模型托管平台",
                        "offline is set (DHLLM_OFFLINE / HF_HUB_OFFLINE): hubs not probed")]
    hubs = hubs or default_hubs()
    with ThreadPoolExecutor(len(hubs)) as pool:
        answers = list(pool.map(lambda hub: hub_reachable(hub[1], timeout=timeout), hubs))
    up = [label for (label, _), ok in zip(hubs, answers, strict=True) if ok]
    down = [f"{label} ({url})" for (label, url), ok in zip(hubs, answers, strict=True) if not ok]
    if not up:
        return [Finding("hubs", "problem", f"哪个模型托管平台都连不上：{', '.join(down)}",
                        f"no hub answers: {', '.join(down)}",
                        "检查网络和代理；在教室里：HF_ENDPOINT=http://老师的电脑:8090；"
                        "或者 DHLLM_OFFLINE=1，只用本机已有的模型（内置的替代模型）")]
    found = [_ok("hubs", f"能连上：{', '.join(up)}", f"answering: {', '.join(up)}")]
    if hubs[0][0] not in up and "hf-mirror" in up:
        found.append(Finding("hubs", "problem", f"{hubs[0][1]} 连不上，hf-mirror 可以",
                             f"{hubs[0][1]} does not answer, hf-mirror does",
                             "在启动 Python 或 Jupyter 之前 export HF_ENDPOINT=https://hf-mirror.com"
                             "（PowerShell：$env:HF_ENDPOINT=\"https://hf-mirror.com\"）"))
    elif down:
        found.append(Finding("hubs", "note", f"连不上：{', '.join(down)}", f"not answering: {', '.join(down)}"))
    return found


# ---------------------------------------------------------------- cloud APIs

GEMINI_URL = "https://generativelanguage.googleapis.com"
OPENAI_URL = "https://api.openai.com/v1"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cloud_url(name: str) -> str:
    """Where provider ``name`` (gemini or a preset) is called: its base-URL variable, else its
    default; the same variables the backends and the SDKs read."""
    from helpers.chat.presets import get_preset

    if name == "gemini":
        return os.environ.get("GOOGLE_GEMINI_BASE_URL") or GEMINI_URL
    preset = get_preset(name)
    sdk_default = os.environ.get("OPENAI_BASE_URL") if name == "openai" else None
    return os.environ.get(preset.base_url_env) or sdk_default or preset.base_url or OPENAI_URL


def probe_clouds(names: list[str], timeout: float | None = None) -> dict[str, bool | None]:
    """Which providers answer HTTP within ``timeout`` s (DHLLM_CLOUD_PROBE_TIMEOUT), probed in
    parallel like the hubs: True, False, or None when offline is set (DHLLM_OFFLINE /
    HF_HUB_OFFLINE) and the address is not this machine's, so it was not probed."""
    from urllib.parse import urlparse

    from helpers.hub import hub_reachable

    timeout = get_settings().cloud_probe_timeout if timeout is None else timeout
    urls = {name: cloud_url(name) for name in names}
    probed = {name: url for name, url in urls.items()
              if not _offline() or urlparse(url).hostname in LOOPBACK}
    with ThreadPoolExecutor(max(len(probed), 1)) as pool:
        answers = dict(zip(probed, pool.map(lambda u: hub_reachable(u, timeout=timeout),
                                            probed.values()), strict=True))
    return {name: answers.get(name) for name in names}


def check_clouds(timeout: float | None = None) -> list[Finding]:
    """The cloud providers whose API key is set: which answer; OpenAI or Gemini not answering
    (mainland China without a VPN) is a problem with the way out."""
    from helpers.chat import clouds_with_keys
    from helpers.chat.cloud_common import BLOCKED_IN_CHINA, REACHABLE_FROM_CHINA

    answers = probe_clouds(clouds_with_keys(), timeout)
    if not answers:
        return []
    up = [name for name, ok in answers.items() if ok]
    down = [name for name, ok in answers.items() if ok is False]
    found = [_ok("clouds", f"设置了密钥、能连上的服务商：{', '.join(up) or '无'}",
                 f"cloud providers with a key that answer: {', '.join(up) or 'none'}")]
    if None in answers.values():
        found.append(Finding("clouds", "note", "已设置离线（DHLLM_OFFLINE），不检查云端服务商",
                             "offline is set: cloud providers not probed"))
    blocked = [name for name in down if name in BLOCKED_IN_CHINA]
    if blocked:
        found.append(Finding(
            "clouds", "problem", f"{', '.join(blocked)} 连不上（在中国大陆不开 VPN 时就是这样）",
            f"{', '.join(blocked)} does not answer (as from mainland China without a VPN)",
            f"改用国内可以直接访问的服务商（{', '.join(REACHABLE_FROM_CHINA)}，设置它的 API 密钥），"
            f"或者在启动 Jupyter 之前设置代理：export HTTPS_PROXY=http://127.0.0.1:<代理端口>"))
    others = [name for name in down if name not in BLOCKED_IN_CHINA]
    if others:
        found.append(Finding("clouds", "problem", f"{', '.join(others)} 连不上",
                             f"{', '.join(others)} does not answer",
                             "检查网络、代理（HTTPS_PROXY）和 DHLLM_<服务商>_BASE_URL"))
    return found


# ---------------------------------------------------------------- ports and Colab


def check_ports(ports: dict[str, int] | None = None) -> list[Finding]:
    """The notebooks' ports (``NOTEBOOK_PORTS``): free, held by a notebook kernel, or blocked."""
    from helpers.background_server import port_holder, port_in_use_message, port_taken

    ports = ports or NOTEBOOK_PORTS
    found, free = [], []
    for owner, port in ports.items():
        if not port_taken("127.0.0.1", port):
            free.append(port)
            continue
        holder = port_holder(port)
        kernel = holder and (holder[0] == os.getpid() or any("ipykernel" in p for p in holder[1]))
        if kernel:  # a notebook's own server, e.g. 02's while 03 runs: expected
            found.append(Finding("ports", "note", f"端口 {port}（notebook {owner}）被一个 notebook 内核占着",
                                 f"port {port} (notebook {owner}) is held by a notebook kernel"))
        else:
            found.append(Finding("ports", "problem", f"端口 {port}（notebook {owner}）被别的程序占用",
                                 port_in_use_message("127.0.0.1", port),
                                 f"停掉那个程序（lsof -i :{port}；Windows：netstat -ano | "
                                 f"findstr :{port}），或者换一个端口"))
    if free:
        found.insert(0, _ok("ports", f"端口空闲：{', '.join(map(str, free))}",
                            f"free ports: {', '.join(map(str, free))}"))
    return found


def is_colab() -> bool:
    """True inside Google Colab (Kaggle sets COLAB_RELEASE_TAG too: kagglehub PR #230)."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return False
    return bool(os.environ.get("COLAB_RELEASE_TAG")) or importlib.util.find_spec("google.colab") is not None


def check_colab(colab: bool, cuda: bool) -> list[Finding]:
    """On Colab: a GPU runtime, a fresh runtime per notebook, models kept on Google Drive."""
    if not colab:
        return []
    found = [Finding("colab", "note",
                     "Colab：每个 notebook 是一个新的运行时，本机磁盘上的文件随运行时一起消失；"
                     "02 号 notebook 把 Linly-7B（约 13.6 GB）下载到 Google Drive 的 "
                     "/content/drive/MyDrive/dhllm/models，之后的运行时（05 号 notebook 也是）直接用，不用重新下载",
                     "Colab: each notebook gets a fresh runtime whose disk goes with it; notebook 02 "
                     "downloads Linly-7B (~13.6 GB) to Google Drive, /content/drive/MyDrive/dhllm/models, "
                     "where later runtimes (notebook 05 too) find it")]
    if not cuda:
        found.insert(0, Finding("colab", "problem", "Colab 运行时没有 GPU",
                                "this Colab runtime has no GPU",
                                "代码执行程序 → 更改运行时类型 → T4 GPU（Runtime → Change runtime "
                                "type → T4 GPU），然后重新运行 notebook"))
    return found


# ---------------------------------------------------------------- all together


def _guarded(check: str, run) -> list[Finding]:
    """Run one check; a check that crashes is reported, never stops the others."""
    try:
        found = run()
    except Exception as exc:
        return [Finding(check, "note", f"检查失败：{exc!r}", f"the check failed: {exc!r}")]
    return found if isinstance(found, list) else [found]


def run_checks(hubs: bool = True) -> list[Finding]:
    """Every check, in the order a learner meets them; ``hubs=False`` skips the network probes."""
    build = torch_build()
    smi = nvidia_smi()
    gpu = build.gpu if build else None
    if gpu is None and smi and smi.gpus:  # CPU torch on a GPU machine: what the GPU would allow
        # nvidia-smi gives no compute capability on older drivers: assume a T4's (fp16); the
        # memory needed is the same in bf16.
        gpu = Gpu(smi.gpus[0][0], smi.gpus[0][1] / 1024, (7, 5))
    found = _guarded("python", check_python) + _guarded("torch", lambda: check_torch(build, smi))
    found += _guarded("gpu", lambda: check_gpu_memory(gpu))
    hub_found = _guarded("hubs", check_hubs) if hubs else []
    nothing_up = any(f.level == "problem" and f.en.startswith("no hub") for f in hub_found)
    online = not (_offline() or nothing_up)
    found += _guarded("disk", lambda: check_chosen_model_disk(online))
    found += _guarded("proxy", check_proxies) + hub_found
    found += (_guarded("clouds", check_clouds) if hubs else []) + _guarded("ports", check_ports)
    found += _guarded("colab", lambda: check_colab(is_colab(), bool(build and build.available)))
    return found


def report(findings: list[Finding]) -> str:
    """The full report: one block per finding, then a verdict line."""
    marks = {"ok": "✓", "note": "·", "problem": "✗"}
    lines = [f"dhllm doctor — Python {platform.python_version()}, {platform.system()}"]
    for f in findings:
        lines.append(f"{marks[f.level]} [{f.check}] {f.zh}")
        lines.append(f"    {f.en}")
        if f.fix:
            lines.append(f"    修复：{f.fix}")
    problems = sum(f.level == "problem" for f in findings)
    lines.append(f"{problems} 个问题 / {problems} problem(s)" if problems
                 else "没有发现问题 / no problems found")
    return "\n".join(lines)


def print_problems(hubs: bool = False) -> None:
    """The notebooks' one-liner: silent when all is well, else one line per problem with its fix.

    Returns None, so that a notebook cell ending with it shows nothing more. ``hubs=False``: the
    setup cell's ``describe_environment`` already says whether a hub answers.
    """
    for finding in run_checks(hubs=hubs):
        if finding.level == "problem":
            print(f"⚠ {finding.line()}")
