"""``dhllm doctor`` against real conditions: a port held by another process, proxy variables that
really send 127.0.0.1 to a proxy, hubs on 127.0.0.1 that answer or not, and a fake torch build
and a fake ``nvidia-smi`` put first on the paths of a real ``dhllm doctor`` process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from helpers import doctor
from helpers.background_server import free_port
from helpers.hardware import Gpu
from tests.test_notebooks import NOTEBOOKS, setup_cell

ROOT = Path(__file__).resolve().parents[1]
PROXY_NAMES = ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
               "no_proxy", "NO_PROXY"]


class _Answer(BaseHTTPRequestHandler):
    """Answers every request with ``self.server.status`` and counts them."""

    def _reply(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _reply

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass


@contextmanager
def http_server(status: int = 200, body: bytes = b"ok") -> Iterator[ThreadingHTTPServer]:
    """A real HTTP server on 127.0.0.1 answering ``status`` with ``body``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    server.status, server.body, server.hits = status, body, 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def url_of(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_NAMES:
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- ports


def test_a_port_held_by_another_process_is_a_problem_naming_it():
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import socket, sys, time\n"
        f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
        "print('listening', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "listening"
        free = free_port()
        found = doctor.check_ports({"02": port, "03": free})
    finally:
        holder.kill()
        holder.wait()
    problem = [f for f in found if f.level == "problem"]
    assert len(problem) == 1, found
    assert f"端口 {port}（notebook 02）被别的程序占用" in problem[0].zh
    assert f"进程 {holder.pid}" in problem[0].en  # who holds it, from psutil
    assert f"lsof -i :{port}" in problem[0].fix and f"findstr :{port}" in problem[0].fix
    assert [f.en for f in found if f.level == "ok"] == [f"free ports: {free}"]
    assert all(f.level != "problem" for f in doctor.check_ports({"02": port}))  # freed


def test_a_port_held_by_this_kernel_is_only_a_note():
    """A notebook's own server (this process) is expected, e.g. 02's while its cells run."""
    with http_server() as server:
        port = server.server_address[1]
        found = doctor.check_ports({"02": port})
    assert [f.level for f in found] == ["note"]
    assert f"port {port} (notebook 02) is held by a notebook kernel" == found[0].en


# ---------------------------------------------------------------- proxies


@pytest.mark.parametrize("name", ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"])
def test_a_proxy_variable_that_captures_127_0_0_1_and_the_no_proxy_fix(
        name: str, monkeypatch: pytest.MonkeyPatch, no_proxies: None):
    """The doctor's verdict matches what requests really does with the same environment."""
    with http_server(502, b"from the proxy") as proxy, http_server(200, b"from the server") as target:
        target_url = url_of(target)
        monkeypatch.setenv(name, url_of(proxy))
        # The requests really go to the proxy: the problem is real.
        assert requests.get(target_url, timeout=5).text == "from the proxy"
        found = doctor.check_proxies(target_url)
        assert found.level == "problem", found
        assert name in found.zh and f"would send requests for {target_url}" in found.en
        assert "NO_PROXY=127.0.0.1,localhost" in found.fix and "$env:NO_PROXY" in found.fix

        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # the fix
        assert requests.get(target_url, timeout=5).text == "from the server"
        fixed = doctor.check_proxies(target_url)
        assert fixed.level == "ok" and "none applies to" in fixed.en


def test_an_https_proxy_does_not_capture_plain_http(monkeypatch: pytest.MonkeyPatch,
                                                    no_proxies: None):
    with http_server(502, b"from the proxy") as proxy, http_server(200, b"from the server") as target:
        monkeypatch.setenv("HTTPS_PROXY", url_of(proxy))
        assert requests.get(url_of(target), timeout=5).text == "from the server"
        assert doctor.check_proxies(url_of(target)).level == "ok"


def test_no_proxy_variables_is_fine(no_proxies: None):
    assert doctor.check_proxies().en == "no proxy variables set"


# ---------------------------------------------------------------- hubs


def test_hubs_that_answer_and_hubs_that_do_not(monkeypatch: pytest.MonkeyPatch, no_proxies: None):
    monkeypatch.delenv("DHLLM_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with http_server() as up:
        found = doctor.check_hubs([("HF_ENDPOINT", url_of(up)), ("hf-mirror", closed)], timeout=2)
        assert [f.level for f in found] == ["ok", "note"]
        assert found[0].en == "answering: HF_ENDPOINT" and closed in found[1].en

        # huggingface.co blocked, hf-mirror answering: the fix is HF_ENDPOINT.
        found = doctor.check_hubs([("Hugging Face", closed), ("hf-mirror", url_of(up))], timeout=2)
        assert found[1].level == "problem" and f"{closed} does not answer" in found[1].en
        assert "export HF_ENDPOINT=https://hf-mirror.com" in found[1].fix

        monkeypatch.setenv("DHLLM_OFFLINE", "1")  # offline: nothing is probed
        hits = up.hits  # type: ignore[attr-defined]
        found = doctor.check_hubs([("HF_ENDPOINT", url_of(up))])
        assert [f.level for f in found] == ["note"] and "offline" in found[0].en
        assert up.hits == hits  # type: ignore[attr-defined]

    monkeypatch.delenv("DHLLM_OFFLINE")
    found = doctor.check_hubs([("HF_ENDPOINT", closed)], timeout=2)
    assert [f.level for f in found] == ["problem"]
    assert found[0].en == f"no hub answers: HF_ENDPOINT ({closed})"
    assert "DHLLM_OFFLINE=1" in found[0].fix


# ---------------------------------------------------------------- cloud providers

CLOUD_VARS = ["GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENAI_API_KEY", "ZHIPUAI_API_KEY",
              "DEEPSEEK_API_KEY", "DASHSCOPE_API_KEY", "MOONSHOT_API_KEY", "OPENAI_BASE_URL",
              "GOOGLE_GEMINI_BASE_URL", "DHLLM_OPENAI_BASE_URL", "DHLLM_DEEPSEEK_BASE_URL",
              "DHLLM_OFFLINE", "HF_HUB_OFFLINE"]


def test_clouds_that_answer_and_a_gemini_that_does_not(monkeypatch: pytest.MonkeyPatch,
                                                        no_proxies: None):
    """Issue 23: with a Gemini key set and Gemini silent (mainland China without a VPN), the
    doctor says so in Chinese and names the providers that answer from China; DHLLM_OFFLINE
    leaves other machines unprobed but still probes this one."""
    from tests.fakes import SilentServer

    for name in CLOUD_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "g-key")
    monkeypatch.setenv("DEEPSEEK_API_KEY", "d-key")
    with SilentServer() as silent, http_server(status=404) as deepseek:
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", silent.url)
        monkeypatch.setenv("DHLLM_DEEPSEEK_BASE_URL", url_of(deepseek))
        assert doctor.probe_clouds(["gemini", "deepseek"], timeout=1) == {
            "gemini": False, "deepseek": True}
        found = doctor.check_clouds(timeout=1)
        assert [f.level for f in found] == ["ok", "problem"]
        assert "deepseek" in found[0].zh
        assert "gemini 连不上" in found[1].zh and "VPN" in found[1].zh
        assert "deepseek, zhipu, dashscope" in found[1].fix and "HTTPS_PROXY" in found[1].fix
        assert silent.connections == 2

        monkeypatch.setenv("DHLLM_OFFLINE", "1")
        monkeypatch.setenv("OPENAI_API_KEY", "o-key")  # api.openai.com: not probed offline
        assert doctor.probe_clouds(["gemini", "openai", "deepseek"], timeout=1) == {
            "gemini": False, "openai": None, "deepseek": True}
    assert doctor.cloud_url("openai") == "https://api.openai.com/v1"
    assert doctor.cloud_url("zhipu") == "https://open.bigmodel.cn/api/paas/v4/"


# ---------------------------------------------------------------- Python, disk, GPU memory


def test_python_version_against_requires_python():
    assert doctor.check_python((3, 11, 7), ">=3.10").level == "ok"
    old = doctor.check_python((3, 9, 18), ">=3.10")
    assert old.level == "problem" and "3.9.18" in old.en and ">=3.10" in old.en and old.fix
    assert doctor.check_python().level == "ok"  # this interpreter, the installed metadata


def test_disk_space_for_a_download(tmp_path: Path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    folder = tmp_path / "not" / "yet" / "there"  # the cache dir before its first download
    assert doctor.check_disk(folder, 1e6, "qwen2.5-0.5b-instruct").level == "ok"
    assert doctor.check_disk(folder, 0, "embedded").en.startswith("embedded needs no download")
    short = doctor.check_disk(folder, free + 1e12, "linly-7b")
    assert short.level == "problem" and "DHLLM_CACHE_DIR" in short.fix
    assert f"downloads ~{(free + 1e12) / 1e9:.1f} GB" in short.en
    assert doctor.download_bytes("linly-7b") / 1e9 == pytest.approx(13.5, abs=0.2)


@pytest.mark.parametrize(("gib", "levels", "words"), [
    (14.74, ["note"], "fits in 16-bit"),  # a T4 as torch reports it: tight
    (39.4, ["ok"], "fits in 16-bit"),  # A100 40GB
    (11.6, ["note", "problem"], "will load in 4bit"),  # RTX 3060 12 GB, no bitsandbytes
    (3.6, ["note"], "even in 4bit"),
])
def test_what_gpu_memory_means_for_linly_7b(gib: float, levels: list[str], words: str,
                                            monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DHLLM_QUANTIZE", raising=False)
    found = doctor.check_gpu_memory(Gpu("GPU", gib, (7, 5)), bitsandbytes=False)
    assert [f.level for f in found] == levels and words in found[0].en
    if "problem" in levels:
        assert "bitsandbytes" in found[1].en and "bitsandbytes>=0.43" in found[1].fix
    assert [f.level for f in doctor.check_gpu_memory(Gpu("GPU", 11.6, (8, 6)), True)] == ["note"]
    # DHLLM_QUANTIZE=4bit on a big card: 4-bit is what loads, so bitsandbytes is needed there too.
    monkeypatch.setenv("DHLLM_QUANTIZE", "4bit")
    big = doctor.check_gpu_memory(Gpu("GPU", 39.4, (8, 0)), bitsandbytes=False)
    assert [f.level for f in big] == ["note", "problem"]


# ---------------------------------------------------------------- a real `dhllm doctor` process

FAKE_TORCH = """\
__version__ = {version!r}


class version:
    cuda = {cuda!r}


class cuda:
    @staticmethod
    def is_available():
        return False
"""

FAKE_SMI = """#!/bin/sh
case "$1" in
  --query-gpu=*) echo "{name}, {mib}" ;;
  *) echo "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: {driver_cuda} |" ;;
esac
"""


def run_doctor(tmp_path: Path, *, torch_cuda: str | None = None, gpu: tuple[str, int] | None = None,
               driver_cuda: str = "12.4", extra_env: dict[str, str] | None = None,
               fake_packages: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``python -m helpers doctor --no-hubs`` with a fake torch (and nvidia-smi) first on the paths."""
    fakes = tmp_path / "site"
    (fakes / "torch").mkdir(parents=True)
    version = f"2.13.0+cu{torch_cuda.replace('.', '')}" if torch_cuda else "2.13.0+cpu"
    (fakes / "torch" / "__init__.py").write_text(FAKE_TORCH.format(version=version, cuda=torch_cuda))
    for name in fake_packages:
        (fakes / name).mkdir()
        (fakes / name / "__init__.py").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gpu:
        smi = bin_dir / "nvidia-smi"
        smi.write_text(FAKE_SMI.format(name=gpu[0], mib=gpu[1], driver_cuda=driver_cuda))
        smi.chmod(0o755)
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvidia-smi").exists()]
    env = {k: v for k, v in os.environ.items() if k not in PROXY_NAMES}
    env.update(PYTHONPATH=os.pathsep.join([str(fakes), str(ROOT)]), DHLLM_OFFLINE="1",
               PATH=os.pathsep.join([str(bin_dir), *path]), **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "helpers", "doctor", "--no-hubs"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cpu_torch_on_a_machine_with_an_nvidia_gpu(tmp_path: Path):
    result = run_doctor(tmp_path, gpu=("Tesla T4", 15360))
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "✗ [torch] 有 NVIDIA GPU（Tesla T4），但 torch 2.13.0+cpu 是 CPU 版，用不了 GPU" in out
    assert "torch 2.13.0+cpu is a CPU build and cannot use it" in out
    assert "--index-url https://download.pytorch.org/whl/cu126" in out
    # What the GPU allows once torch can use it (nvidia-smi's 15360 MiB; torch says 14.74 GiB).
    assert "Tesla T4（15.0 GiB）：Linly-7B 可以用 16 位加载" in out
    assert "Linly-7B fits in 16-bit (~14.4 GiB incl. a 2k-token KV cache), 0.6 GiB to spare" in out


def test_cuda_torch_with_a_driver_too_old(tmp_path: Path):
    result = run_doctor(tmp_path, torch_cuda="13.0", gpu=("NVIDIA GeForce RTX 3070", 8192),
                        driver_cuda="12.4")
    out = result.stdout
    assert result.returncode == 1
    assert "the driver supports CUDA 12.4 at most; torch 2.13.0+cu130 needs 13.0" in out
    assert "更新 NVIDIA 驱动" in out
    # 8 GiB: Linly-7B in 4-bit, and bitsandbytes is missing (a fake one below makes it present).
    assert "Linly-7B will load in 4bit" in out


def test_bitsandbytes_is_a_problem_only_when_4bit_would_be_chosen(tmp_path: Path):
    import importlib.util

    gpu = ("NVIDIA GeForce RTX 3060", 12288)
    if importlib.util.find_spec("bitsandbytes") is None:  # the condition itself, not a mock
        missing = run_doctor(tmp_path / "a", torch_cuda="12.6", gpu=gpu, driver_cuda="12.6")
        assert "✗ [bitsandbytes] 4bit 加载需要 bitsandbytes，但没有安装" in missing.stdout
        assert 'pip install "bitsandbytes>=0.43"' in missing.stdout
    present = run_doctor(tmp_path / "b", torch_cuda="12.6", gpu=gpu, driver_cuda="12.6",
                         fake_packages=("bitsandbytes",))
    assert "[bitsandbytes]" not in present.stdout
    big = run_doctor(tmp_path / "c", torch_cuda="12.6", gpu=("NVIDIA A100-SXM4-40GB", 40960))
    assert "[bitsandbytes]" not in big.stdout and "Linly-7B fits in 16-bit" in big.stdout


def test_no_gpu_cpu_torch_is_fine_and_the_exit_code_follows_the_problems(tmp_path: Path):
    result = run_doctor(tmp_path)
    out = result.stdout
    assert "✓ [torch] 没有 NVIDIA GPU，torch 2.13.0+cpu（CPU 版）在 CPU 上运行" in out
    assert "[hubs]" not in out  # --no-hubs: not probed, not reported
    problems = out.count("\n✗ ")
    assert result.returncode == (1 if problems else 0), out
    assert out.rstrip().endswith("no problems found" if not problems else "problem(s)")


def test_colab_without_a_gpu_runtime(tmp_path: Path):
    result = run_doctor(tmp_path / "colab", extra_env={"COLAB_RELEASE_TAG": "release-colab_test"})
    assert "✗ [colab] Colab 运行时没有 GPU" in result.stdout
    assert "Runtime → Change runtime type → T4 GPU" in result.stdout
    assert "/content/drive/MyDrive/dhllm/models" in result.stdout  # where 02 keeps models on Colab
    kaggle = run_doctor(tmp_path / "kaggle", extra_env={
        "COLAB_RELEASE_TAG": "release-colab_test", "KAGGLE_KERNEL_RUN_TYPE": "Interactive"})
    assert "[colab]" not in kaggle.stdout  # Kaggle's image sets COLAB_RELEASE_TAG too


def test_the_cli_probes_the_hub_in_hf_endpoint(tmp_path: Path):
    closed = f"http://127.0.0.1:{free_port()}"
    with http_server() as up:
        env = {k: v for k, v in os.environ.items() if k not in PROXY_NAMES and k != "DHLLM_OFFLINE"}
        env.update(PYTHONPATH=str(ROOT), HF_ENDPOINT=url_of(up), MODELSCOPE_ENDPOINT=closed)
        result = subprocess.run([sys.executable, "-m", "helpers", "doctor"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
    assert "answering: HF_ENDPOINT" in result.stdout, result.stdout + result.stderr
    assert f"ModelScope ({closed})" in result.stdout
    assert up.hits >= 1  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the notebooks' one-liner


def test_print_problems_is_silent_when_well_and_one_line_per_problem(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_proxies: None):
    # Only a free port of our own: other programs on this machine may use the real ones.
    monkeypatch.setattr(doctor, "NOTEBOOK_PORTS", {"02": free_port()})
    assert doctor.print_problems() is None  # a cell ending with it shows nothing more
    assert capsys.readouterr().out == ""

    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    doctor.print_problems()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("⚠ [proxy] http_proxy 会把发往")
    assert "would send requests for http://127.0.0.1:7871" in lines[0]
    assert "修复：export NO_PROXY=127.0.0.1,localhost" in lines[0]


def test_the_setup_cell_runs_the_one_liner():
    for path in NOTEBOOKS:
        assert "print_problems()" in setup_cell(path), path.name
