"""Notebook 05 on a GPU (issue 23): it reuses the model notebook 02 downloaded (never a second
download), and it never starts vLLM on a GPU that a loaded model fills: it frees the model first
and asks ``vllm_gpu_problem`` (fed by a fake ``nvidia-smi``) whether vLLM's share is free."""

from __future__ import annotations

import gc
import json
import os
import shutil
import weakref
from pathlib import Path

import pytest
import requests

from helpers.models.reuse import choose_downloaded_model
from helpers.server.vllm.gpu import GpuMemory, gpu_memory, requested_utilization, vllm_gpu_problem
from tests.test_models import GPUS, fake_gpu, isolated, no_gpu  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_digital_human.ipynb"


def code_cells() -> list[str]:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


# ---------------------------------------------------------------- no second download

@pytest.fixture
def no_hub(isolated):  # noqa: F811
    """Any probe of a hub (the first step of a download) fails the test."""
    def probe(*args: object, **kwargs: object) -> bool:
        raise AssertionError("notebook 05 may not look for a hub: it never downloads")

    isolated.setattr("helpers.hub.locate.hub_reachable", probe)
    return isolated


def test_a_t4_without_the_downloaded_model_gets_the_stand_in_and_is_told_how(no_hub, capsys):
    fake_gpu(no_hub, *GPUS["T4"])
    choice = choose_downloaded_model("linly-7b")
    assert (choice.name, choice.device, choice.path, choice.source) == ("embedded", "cpu", None, None)
    out = capsys.readouterr().out
    for words in ("不会自己下载", "02 号 notebook 的下载单元格", "替代模型", "linly-7b"):
        assert words in out, out


def test_a_t4_reuses_the_folder_notebook_02_filled(no_hub, tiny_llama_dir, capsys):
    fake_gpu(no_hub, *GPUS["T4"])
    folder = Path("models/Chinese-LLaMA-2-7B-hf")  # the chapter's --local-dir, beside the notebook
    shutil.copytree(tiny_llama_dir, folder)
    choice = choose_downloaded_model("linly-7b")
    assert (choice.name, choice.device, choice.dtype, choice.path) == (
        "linly-7b", "cuda", "float16", str(folder))
    assert f"从本地文件夹 {folder} 加载" in capsys.readouterr().out


def test_a_cpu_reuses_the_small_chinese_model_and_overrides_are_honoured(no_hub, tiny_model_dir):
    no_hub.setattr("torch.cuda.is_available", lambda: False)
    assert choose_downloaded_model(verbose=False).name == "embedded"
    shutil.copytree(tiny_model_dir, "models/Qwen2.5-0.5B-Instruct")
    assert choose_downloaded_model(verbose=False).name == "qwen2.5-0.5b-instruct"
    no_hub.setenv("DHLLM_MODEL", "qwen2.5-1.5b-instruct")  # asked for, but not on disk
    choice = choose_downloaded_model(verbose=False)
    assert choice.name == "embedded" and "DHLLM_MODEL=qwen2.5-1.5b-instruct" in choice.message
    no_hub.setenv("DHLLM_MODEL", "embedded")
    assert choose_downloaded_model(verbose=False).name == "embedded"


def test_notebook_05_loads_only_what_is_on_disk():
    code = "\n".join(code_cells())
    assert 'choose_downloaded_model("linly-7b")' in code
    for call in ("choose_model(", "load_model(", "model_folder(", "download("):
        assert call not in code, f"notebook 05 calls {call}: it could start a download"


# ---------------------------------------------------------------- vLLM and a full GPU

FAKE_SMI = """#!/bin/sh
case "$1" in
  --query-gpu=*) printf '%s\\n' {rows} ;;
  *) exit 1 ;;
esac
"""


def fake_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *rows: str) -> None:
    """``nvidia-smi`` first on PATH, answering the query with ``rows`` (index, free MiB, total MiB)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI.format(rows=" ".join(f"'{r}'" for r in rows)))
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_a_t4_that_still_holds_linly_is_refused_with_the_reason(monkeypatch, tmp_path):
    # Linly-7B in fp16 (12.7 GiB of weights, docs/gpu_check.md) loaded in another kernel.
    fake_smi(monkeypatch, tmp_path, "0, 1536, 15360")
    assert gpu_memory() == [GpuMemory("0", 1536.0, 15360.0)]
    problem = vllm_gpu_problem()
    assert problem is not None
    for words in ("GPU 0", "1.5 GiB 空闲", "92%", "Shut Down Kernel", "--gpu-memory-utilization"):
        assert words in problem, problem
    # Freed (an idle T4 as nvidia-smi shows it): vLLM's 92 % and its own context fit.
    fake_smi(monkeypatch, tmp_path, "0, 15095, 15360")
    assert vllm_gpu_problem() is None


def test_the_share_asked_for_in_vllm_args_is_the_one_checked(monkeypatch, tmp_path):
    fake_smi(monkeypatch, tmp_path, "0, 1536, 15360")
    assert requested_utilization([]) == 0.92  # vLLM 0.32's default
    assert requested_utilization(["--enforce-eager", "--gpu-memory-utilization", "0.05"]) == 0.05
    assert requested_utilization(["--gpu-memory-utilization=0.5"]) == 0.5
    assert vllm_gpu_problem(["--gpu-memory-utilization", "0.05"]) is None  # 768 + 512 MiB fit
    assert "50%" in (vllm_gpu_problem(["--gpu-memory-utilization=0.5"]) or "")


def test_only_the_gpus_vllm_will_use_are_checked(monkeypatch, tmp_path):
    fake_smi(monkeypatch, tmp_path, "0, 1024, 15360", "1, 15095, 15360", "2, [N/A], [N/A]")
    assert [g.index for g in gpu_memory()] == ["0", "1"]  # a row without figures is skipped
    assert "GPU 0" in (vllm_gpu_problem() or "")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # vLLM's cuda:0 is GPU 1 then
    assert vllm_gpu_problem() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert vllm_gpu_problem(count=1) is None
    assert "GPU 0" in (vllm_gpu_problem(count=2) or "")  # two replicas: GPU 0 is the second


def test_no_nvidia_smi_means_no_gpu_to_check(monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvidia-smi").exists()))
    assert gpu_memory() == [] and vllm_gpu_problem() is None


def test_stopping_the_server_and_deleting_the_names_frees_the_model(tiny_model_dir):
    """Notebook 05's lines before vLLM: after them nothing holds the model, so CUDA could free it."""
    from helpers.chat import TransformersChat
    from helpers.server import create_app, serve_in_background
    from tests.conftest import free_port

    freeing = next(c for c in code_cells() if "vllm_gpu_problem" in c and "start_vllm_engine" in c)
    for line in ("server.stop()", "del server, app, chat_model", "gc.collect()",
                 "torch.cuda.empty_cache()"):
        assert line in freeing, line
    chat_model = TransformersChat.load(str(tiny_model_dir), verbose=False)
    app = create_app(chat_model)
    server = serve_in_background(app, port=free_port())
    reply = requests.post(server.url, json={"prompt": "hi", "max_length": 4}, timeout=60)
    assert reply.status_code == 200, reply.text
    model = weakref.ref(chat_model.model)
    server.stop()
    del server, app, chat_model
    gc.collect()
    assert model() is None, [type(r).__name__ for r in gc.get_referrers(model())]
