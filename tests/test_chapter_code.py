"""The notebooks show the chapter's own code and run it: loading in 02, the SDK calls in 04."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def cells(name: str, kind: str | None = None) -> list[str]:
    found = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in found if kind is None or c["cell_type"] == kind]


def test_02_loads_the_model_with_the_chapters_own_calls():
    code = "\n".join(cells("02_linly_api.ipynb", "code"))
    assert "AutoTokenizer.from_pretrained(model_path, use_fast=False)" in code
    assert re.search(r"AutoModelForCausalLM\.from_pretrained\(model_path, dtype=dtype, "
                     r"device_map=device_map,\s+quantization_config=quantization\)", code)
    assert "model.eval()" in code
    assert "TransformersChat.load" not in code  # the learner's own model serves the chat wrapper
    assert "TransformersChat.wrap(model, tokenizer" in code


def test_02_stays_near_the_chapter():
    assert len(cells("02_linly_api.ipynb")) <= 36
    text = "\n".join(cells("02_linly_api.ipynb"))
    for gone in ("stream_sentences", "chat_box(", "stream=True"):
        assert gone not in text, f"{gone} belongs to notebook 05"


@pytest.mark.parametrize("name", ["02_linly_api.ipynb", "03_qwen.ipynb", "04_cloud_llms.ipynb"])
def test_learners_never_see_nbval_markers(name):
    assert not any("NBVAL" in source for source in cells(name))


def test_04_writes_the_sdk_calls_out_gemini_first():
    code = "\n".join(cells("04_cloud_llms.ipynb", "code"))
    gemini = code.index(".models.generate_content(")
    openai = code.index(".chat.completions.create(")
    assert code.index("genai.Client(") < gemini < openai, "the chapter's order: Gemini, then ChatGPT"
    assert 'OpenAI(base_url=own_url + "/v1"' in code  # without a key: the learner's own server
    assert "OpenAI(base_url=base_url, api_key=get_secret(preset.key_env), timeout=timeout)" in code
    assert "gpt or gemini" not in code and "clouds_with_keys()" in code
    assert "vllm" not in code.lower()  # vLLM and parallelism live in notebook 05


def cell_with(name: str, marker: str) -> str:
    """The one code cell of notebook ``name`` that contains ``marker``."""
    found = [c for c in cells(name, "code") if marker in c]
    assert len(found) == 1, f"{name}: {len(found)} code cells contain {marker!r}"
    return found[0]


def test_02_downloads_only_in_its_download_cell(monkeypatch, tmp_path, tiny_llama_dir):
    """A T4 with a hub answering and no models/ folder: choosing and loading fetch nothing (the
    load cell says to run the download cell); the download cell fetches; then loading reads the
    folder without a single request to the hub."""
    import dataclasses
    import shutil

    import torch

    from helpers.hub import verify
    from helpers.hub.mirror import mirror_in_background
    from helpers.stand_in import add_stand_in
    from tests.conftest import free_port
    from tests.test_models import CHOICE_ENV, GPUS, fake_gpu

    name = "02_linly_api.ipynb"
    choose = cell_with(name, 'choose_model("linly-7b")')
    download = cell_with(name, "DOWNLOAD = True  #")
    load = cell_with(name, "AutoModelForCausalLM.from_pretrained(model_path")
    for variable in CHOICE_ENV:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DHLLM_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "mirror"
    shutil.copytree(tiny_llama_dir, root / ".dhllm" / "tiny-llama")  # add_stand_in reuses it
    add_stand_in(root, "Linly-AI/Chinese-LLaMA-2-7B-hf", progress=False)
    fake_gpu(monkeypatch, *GPUS["T4"])
    with mirror_in_background(root, port=free_port(), progress=False) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        notebook: dict = {}
        exec(choose, notebook)
        choice = notebook["choice"]
        assert (choice.name, choice.dtype, choice.endpoint) == ("linly-7b", "float16", hub.url)
        model_path = tmp_path / "models" / "Chinese-LLaMA-2-7B-hf"
        assert notebook["model_path"] == str(model_path)  # an absolute path, printed
        def linly_paths() -> set[str]:  # what was asked of the model's repository
            return {p for p in hub.stats.per_path if "Chinese-LLaMA-2-7B-hf" in p}

        probes = hub.stats.requests  # choose_model asks whether the hub answers; nothing more
        assert not linly_paths() and not model_path.exists()

        with pytest.raises(FileNotFoundError, match="下载单元格"):
            exec(load, notebook)
        assert hub.stats.requests == probes and not linly_paths()
        assert not model_path.exists()

        exec(download, notebook)
        assert any(p.endswith("model.safetensors") for p in linly_paths()), linly_paths()
        verify(model_path, repo_id="Linly-AI/Chinese-LLaMA-2-7B-hf", endpoint=hub.url)

        # Loading what was downloaded (on this CPU: the fake T4 cannot hold tensors).
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        notebook["choice"] = dataclasses.replace(choice, device="cpu", dtype="float32")
        fetched = hub.stats.requests
        exec(load, notebook)
        assert hub.stats.requests == fetched  # loading never asks the hub
    assert type(notebook["model"]).__name__ == "LlamaForCausalLM" and not notebook["model"].training


def test_02_shows_the_background_thread_and_the_chapters_requests_line():
    code = "\n".join(cells("02_linly_api.ipynb", "code"))
    for piece in ("uvicorn.Config(app", "uvicorn.Server(config)", "threading.Thread(target=uv_server.run, daemon=True)",
                  "thread.is_alive()", "/health", "uv_server.should_exit = True"):
        assert piece in code, piece
    chapters = 'requests.post(url="http://127.0.0.1:7871", headers=headers, data=json.dumps(data))'
    assert chapters in code and code.index(chapters) < code.index("json={")
    assert code.index("uvicorn.Server(config)") < code.index("serve_in_background(app")
