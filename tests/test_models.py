"""The model registry, device/dtype choice and load_model."""

from __future__ import annotations

import pytest
import torch

from helpers.models import (
    REGISTRY,
    UnsupportedModelError,
    check_remote_code_support,
    choose_model,
    choose_placement,
    get_spec,
    load_model,
)


def test_registry_has_the_chapters_models_with_both_hub_ids():
    for name in ["embedded", "linly-7b", "qwen-1.8b-chat", "qwen2.5-1.5b-instruct",
                 "chatglm3-6b", "glm-4-9b-chat-hf"]:
        assert name in REGISTRY
    assert get_spec("linly-7b").hf_id == "Linly-AI/Chinese-LLaMA-2-7B-hf"
    assert get_spec("linly-7b").prompt_format == "linly"
    assert get_spec("qwen-1.8b-chat").modelscope_id == "qwen/Qwen-1_8B-Chat"
    with pytest.raises(KeyError, match="known models: embedded"):
        get_spec("gpt-5")


@pytest.mark.parametrize(("name", "bound", "alternative"), [
    ("qwen-1.8b-chat", "4.38", "qwen2.5-1.5b-instruct"),
    ("chatglm3-6b", "4.45", "glm-4-9b-chat-hf"),
])
def test_remote_code_models_fail_at_once_on_new_transformers(name, bound, alternative):
    spec = get_spec(name)
    with pytest.raises(UnsupportedModelError) as info:
        check_remote_code_support(spec, "5.24.0")
    message = str(info.value)
    assert f"transformers < {bound}" in message and "5.24.0" in message and alternative in message
    check_remote_code_support(spec, "4.37.2")  # an old enough version passes


def test_load_model_refuses_remote_code_before_any_download(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any fetch would fail
    with pytest.raises(UnsupportedModelError, match="qwen2.5-1.5b-instruct"):
        load_model("qwen-1.8b-chat")


def test_cpu_placement_is_float32_and_overrides_work():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    auto = choose_placement()
    assert (auto.device, auto.dtype) == ("cpu", torch.float32) and "no CUDA" in auto.reason
    assert choose_placement("cpu", "bfloat16").dtype == torch.bfloat16


def test_choose_model_falls_back_without_a_gpu_and_honours_the_override(monkeypatch, capsys):
    monkeypatch.delenv("DHLLM_MODEL", raising=False)
    if not torch.cuda.is_available():
        assert choose_model("linly-7b") == "embedded"
        assert "stand-in for linly-7b" in capsys.readouterr().out
    monkeypatch.setenv("DHLLM_MODEL", "qwen2.5-1.5b-instruct")
    assert choose_model("linly-7b") == "qwen2.5-1.5b-instruct"


def test_load_model_from_a_folder(tiny_model_dir, capsys):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training and tokenizer.chat_template
    assert "cpu, float32" in capsys.readouterr().err or torch.cuda.is_available()
