"""The model registry, device/dtype choice and load_model."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers.chat import TransformersChat
from helpers.hardware import MARGIN_GIB, Gpu, estimate_gib
from helpers.hub.mirror import mirror_in_background
from helpers.models import (
    REGISTRY,
    Placement,
    QuantizationError,
    UnsupportedModelError,
    check_remote_code_support,
    choose_model,
    choose_placement,
    choose_precision,
    describe_environment,
    get_spec,
    load_model,
    local_model_dir,
    quantization_config,
)
from helpers.stand_in import add_stand_in
from tests.conftest import free_port

CHOICE_ENV = ("DHLLM_MODEL", "DHLLM_QUANTIZE", "DHLLM_OFFLINE", "HF_ENDPOINT", "HF_HUB_OFFLINE")


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No user overrides, no models/ folder, an empty cache: only the faked hardware decides."""
    for name in CHOICE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DHLLM_CACHE_DIR", str(tmp_path / "cache"))
    return monkeypatch


@pytest.fixture
def no_gpu(isolated):
    isolated.setattr(torch.cuda, "is_available", lambda: False)
    return isolated


def test_registry_has_the_chapters_models_with_both_hub_ids():
    for name in ["embedded", "linly-7b", "qwen-1.8b-chat", "qwen2.5-1.5b-instruct",
                 "chatglm3-6b", "glm-4-9b-chat-hf", "qwen2.5-0.5b-instruct"]:
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
    # Imported first: huggingface_hub reads HF_ENDPOINT once, and later tests expect its default.
    import huggingface_hub.constants  # noqa: F401

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any fetch would fail
    with pytest.raises(UnsupportedModelError, match="qwen2.5-1.5b-instruct"):
        load_model("qwen-1.8b-chat")


def test_cpu_placement_is_float32_and_overrides_work():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    auto = choose_placement()
    assert (auto.device, auto.dtype) == ("cpu", torch.float32) and "没有 CUDA" in auto.reason
    assert choose_placement("cpu", "bfloat16").dtype == torch.bfloat16


def test_choose_model_falls_back_without_a_gpu_and_honours_the_override(no_gpu, capsys):
    assert choose_model("linly-7b", online=False).name == "embedded"
    out = capsys.readouterr().out
    assert "没有 CUDA GPU" in out and "替代模型" in out and "只会英文" in out and "linly-7b" in out
    no_gpu.setenv("DHLLM_MODEL", "qwen2.5-1.5b-instruct")
    assert choose_model("linly-7b", online=False).name == "qwen2.5-1.5b-instruct"


def test_load_model_from_a_folder(tiny_model_dir, capsys):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training and tokenizer.chat_template
    assert "cpu, float32" in capsys.readouterr().err or torch.cuda.is_available()


# ---------------------------------------------------------------- memory estimates

def test_estimates_match_linly_7b_measured_sizes():
    """Weights as measured on a GPU (docs/gpu_check.md: fp16 12.675 GiB, nf4 3.796 GiB allocated)."""
    spec = get_spec("linly-7b")
    assert spec.params_b == 6.805  # Linly's config: vocab 40076, untied embeddings
    overhead = estimate_gib(spec.params_b, spec.kv_kib_per_token, "float16") - 12.675
    assert overhead == pytest.approx(1.0 + MARGIN_GIB, abs=0.01)  # 2k tokens of KV cache: 1 GiB
    for precision, weights in [("float16", 12.7), ("bfloat16", 12.7), ("8bit", 6.5), ("4bit", 3.8)]:
        estimated = estimate_gib(spec.params_b, spec.kv_kib_per_token, precision) - overhead
        assert estimated == pytest.approx(weights, abs=0.15), precision


# ---------------------------------------------------------------- choose_model on faked GPUs

def fake_gpu(monkeypatch, memory_gib: float, capability: tuple[int, int], name: str) -> None:
    """Make torch report one CUDA device as Colab's T4, an L4, an RTX 3070... would."""
    props = SimpleNamespace(total_memory=int(memory_gib * 2**30), name=name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: name)


GPUS = {
    "T4": (14.74, (7, 5), "Tesla T4"),
    "L4": (22.0, (8, 9), "NVIDIA L4"),
    "A100": (39.4, (8, 0), "NVIDIA A100-SXM4-40GB"),
    "RTX 3060": (11.76, (8, 6), "NVIDIA GeForce RTX 3060"),
    "RTX 3070": (7.6, (8, 6), "NVIDIA GeForce RTX 3070"),
    "GTX 1650": (3.8, (7, 5), "NVIDIA GeForce GTX 1650"),
}


@pytest.mark.parametrize(("gpu", "name", "dtype", "quantize"), [
    ("T4", "linly-7b", "float16", None),  # no native bf16 before Ampere
    ("L4", "linly-7b", "bfloat16", None),
    ("A100", "linly-7b", "bfloat16", None),
    ("RTX 3060", "linly-7b", "bfloat16", "4bit"),  # 16-bit needs ~14.4 GiB
    ("RTX 3070", "linly-7b", "bfloat16", "4bit"),
    ("GTX 1650", "qwen2.5-1.5b-instruct", "float16", None),  # even 4-bit Linly needs ~5.6 GiB
])
def test_choose_model_fits_the_gpu(isolated, capsys, gpu, name, dtype, quantize):
    memory, capability, device_name = GPUS[gpu]
    fake_gpu(isolated, memory, capability, device_name)
    choice = choose_model("linly-7b", online=True)
    assert (choice.name, choice.device, choice.dtype, choice.quantize) == (name, "cuda", dtype, quantize)
    assert str(choice) == name and not isinstance(choice, str)  # a choice, printed as its name
    assert choice.estimated_gib is not None and choice.estimated_gib <= memory
    assert choice.source == "hf" and choice.path is None
    out = capsys.readouterr().out
    assert out.count(device_name) == 1 and name in out and f"{choice.estimated_gib:.1f} GiB" in out


def test_t4_fits_linly_in_fp16_with_little_to_spare(isolated):
    fake_gpu(isolated, *GPUS["T4"])
    choice = choose_model("linly-7b", online=True, verbose=False)
    assert 13.5 < choice.estimated_gib < 14.74  # weights 12.6 + KV cache 1 + margin


def test_no_gpu_online_picks_qwen_0_5b_on_cpu(no_gpu, capsys):
    choice = choose_model("linly-7b", online=True)
    assert (choice.name, choice.device, choice.dtype, choice.quantize) == (
        "qwen2.5-0.5b-instruct", "cpu", "float32", None)
    assert get_spec(choice.name).hf_id == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "没有 CUDA GPU" in capsys.readouterr().out


def test_no_gpu_offline_picks_the_embedded_stand_in_without_probing(no_gpu, capsys):
    def probe(*args, **kwargs):
        raise AssertionError("offline: no hub may be probed")

    no_gpu.setattr("helpers.hub.locate.hub_reachable", probe)
    no_gpu.setenv("DHLLM_OFFLINE", "1")
    choice = choose_model("linly-7b")
    assert (choice.name, choice.device) == ("embedded", "cpu")
    assert "替代模型" in capsys.readouterr().out


def test_quantize_and_model_overrides(isolated):
    fake_gpu(isolated, *GPUS["T4"])
    isolated.setenv("DHLLM_QUANTIZE", "8bit")
    choice = choose_model("linly-7b", online=True, verbose=False)
    assert (choice.name, choice.quantize, choice.dtype) == ("linly-7b", "8bit", "float16")
    isolated.setenv("DHLLM_MODEL", "qwen2.5-1.5b-instruct")
    isolated.setenv("DHLLM_QUANTIZE", "4bit")
    choice = choose_model("linly-7b", online=True)
    assert (choice.name, choice.quantize) == ("qwen2.5-1.5b-instruct", "4bit")
    assert choice.message.startswith("DHLLM_MODEL=qwen2.5-1.5b-instruct")


def test_quantize_none_means_full_precision_or_a_smaller_model(isolated):
    fake_gpu(isolated, *GPUS["RTX 3070"])
    isolated.setenv("DHLLM_QUANTIZE", "none")
    choice = choose_model("linly-7b", online=True, verbose=False)
    assert (choice.name, choice.dtype, choice.quantize) == ("qwen2.5-1.5b-instruct", "bfloat16", None)


def test_model_override_wins_without_a_gpu_too(no_gpu, tmp_path):
    no_gpu.setenv("DHLLM_MODEL", "linly-7b")  # too big for a CPU, but the user asked for it
    choice = choose_model("qwen2.5-1.5b-instruct", online=False, verbose=False)
    assert (choice.name, choice.device, choice.dtype) == ("linly-7b", "cpu", "float32")
    no_gpu.setenv("DHLLM_MODEL", str(tmp_path))  # a folder
    choice = choose_model("linly-7b", online=False, verbose=False)
    assert choice.path == str(tmp_path) and choice.estimated_gib is None


def test_a_downloaded_folder_is_preferred_and_a_broken_one_skipped(no_gpu, tiny_model_dir, capsys):
    folder = Path("models/Qwen2.5-0.5B-Instruct")
    shutil.copytree(tiny_model_dir, folder)
    assert local_model_dir("qwen2.5-0.5b-instruct") == folder
    choice = choose_model("linly-7b", online=False)  # offline, yet the folder is here
    assert choice.name == "qwen2.5-0.5b-instruct" and choice.path == str(folder)
    assert "本地文件夹" in capsys.readouterr().out
    weights = next(folder.glob("*.safetensors"))
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    assert local_model_dir("qwen2.5-0.5b-instruct") is None
    assert choose_model("linly-7b", online=False, verbose=False).name == "embedded"


def test_a_gpu_loads_linly_from_models_folder_offline_and_says_so_when_it_is_missing(
        isolated, tiny_llama_dir, capsys):
    fake_gpu(isolated, *GPUS["T4"])
    choice = choose_model("linly-7b", online=False, verbose=False)
    assert choice.name == "embedded" and "有 GPU Tesla T4" in choice.message
    folder = Path("models/Chinese-LLaMA-2-7B-hf")  # where notebook 01's command downloads it
    shutil.copytree(tiny_llama_dir, folder)
    choice = choose_model("linly-7b", online=False)
    assert (choice.name, choice.dtype, choice.path) == ("linly-7b", "float16", str(folder))
    assert f"从本地文件夹 {folder} 加载" in capsys.readouterr().out


def test_describe_environment_names_the_model_without_printing(isolated, capsys):
    fake_gpu(isolated, *GPUS["T4"])
    text = describe_environment(online=True)
    assert "Tesla T4" in text and "choose_model('linly-7b') 选择 -> linly-7b, float16, 约 14.4 GiB 显存" in text
    assert len(text.splitlines()) == 2 and capsys.readouterr().out == ""


# ---------------------------------------------------------------- the one precision rule

@pytest.mark.parametrize(("gpu", "quantize", "expected"), [
    (None, None, ("cpu", "float32", None, True)),
    (None, "4bit", ("cpu", "float32", None, True)),  # bitsandbytes needs CUDA: ignored on a CPU
    ("T4", None, ("cuda", "float16", None, True)),  # no native bf16 before Ampere
    ("L4", None, ("cuda", "bfloat16", None, True)),
    ("RTX 3070", None, ("cuda", "bfloat16", "4bit", True)),  # 16-bit does not fit, 4-bit does
    ("T4", "8bit", ("cuda", "float16", "8bit", True)),  # DHLLM_QUANTIZE wins over 16-bit
    ("T4", "4bit", ("cuda", "float16", "4bit", True)),
    ("RTX 3070", "none", ("cuda", "bfloat16", None, False)),  # 16-bit asked: kept, flagged
    ("RTX 3070", "8bit", ("cuda", "bfloat16", "8bit", False)),  # 8-bit needs ~8.3 GiB
    ("GTX 1650", None, ("cuda", "float16", "4bit", False)),  # fits neither: the smallest, flagged
    ("GTX 1650", "none", ("cuda", "float16", None, False)),
])
def test_choose_precision_for_linly_7b(gpu, quantize, expected):
    device = Gpu(GPUS[gpu][2], GPUS[gpu][0], GPUS[gpu][1]) if gpu else None
    spec = get_spec("linly-7b")
    got = choose_precision(spec, device, quantize)
    assert (got.device, got.dtype, got.quantize, got.fits) == expected
    precision = got.quantize or got.dtype
    assert got.need_gib == estimate_gib(spec.params_b, spec.kv_kib_per_token, precision)
    assert got.fits == (device is None or got.need_gib <= device.memory_gib)


def test_choose_precision_for_a_model_of_unknown_size_and_bad_input():
    t4 = Gpu("Tesla T4", 14.74, (7, 5))
    assert choose_precision(None, t4) == choose_precision(None, t4, "none")
    got = choose_precision(None, t4)
    assert (got.dtype, got.quantize, got.need_gib, got.fits) == ("float16", None, None, True)
    assert choose_precision(None, t4, "4bit").quantize == "4bit"
    assert choose_precision(None, None, "8bit").quantize is None
    with pytest.raises(ValueError, match="'4bit', '8bit', 'none' or unset"):
        choose_precision(get_spec("linly-7b"), t4, "3bit")


def test_choose_model_follows_choose_precision_and_dhllm_quantize(isolated):
    fake_gpu(isolated, *GPUS["GTX 1650"])
    isolated.setenv("DHLLM_MODEL", "linly-7b")  # forced: no smaller model to fall back to
    choice = choose_model("linly-7b", online=True, verbose=False)
    assert (choice.dtype, choice.quantize) == ("float16", "4bit") and "可能放不下" in choice.message
    isolated.setenv("DHLLM_QUANTIZE", "none")
    choice = choose_model("linly-7b", online=True, verbose=False)
    assert (choice.dtype, choice.quantize) == ("float16", None) and "可能放不下" in choice.message


# ---------------------------------------------------------------- quantization

def test_quantization_config_kwargs():
    t4 = Placement("cuda", torch.float16, "T4")
    assert quantization_config(None, t4) is None
    assert quantization_config("8bit", t4) == {"load_in_8bit": True}
    assert quantization_config("4bit", t4) == {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": torch.float16, "bnb_4bit_use_double_quant": True}
    ampere = Placement("cuda", torch.bfloat16, "L4")
    assert quantization_config("4bit", ampere)["bnb_4bit_compute_dtype"] == torch.bfloat16
    with pytest.raises(ValueError, match="'4bit', '8bit' or None"):
        quantization_config("3bit", t4)


def test_quantizing_on_cpu_fails_at_once_with_the_fix(no_gpu, tiny_model_dir):
    with pytest.raises(QuantizationError) as info:
        load_model(str(tiny_model_dir), quantize="4bit", verbose=False)
    message = str(info.value)
    assert "CUDA GPU" in message and 'pip install "dhllm[gpu]"' in message and "bitsandbytes" in message


def test_quantizing_without_bitsandbytes_says_what_to_install(isolated, tiny_model_dir):
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    fake_gpu(isolated, *GPUS["RTX 3070"])
    choice = choose_model("linly-7b", online=True, verbose=False)
    with pytest.raises(QuantizationError, match=r"needs bitsandbytes: pip install \"dhllm\[gpu\]\""):
        load_model(choice, verbose=False)  # the choice's 4bit; fails before any download


# ---------------------------------------------------------------- the choice loads

def test_the_no_gpu_online_choice_downloads_from_the_hub_and_answers(no_gpu, tiny_model_dir,
                                                                     tmp_path):
    root = tmp_path / "mirror"
    shutil.copytree(tiny_model_dir, root / ".dhllm" / "tiny-qwen2")  # add_stand_in reuses it
    add_stand_in(root, "Qwen/Qwen2.5-0.5B-Instruct", progress=False)
    with mirror_in_background(root, port=free_port(), progress=False) as handle:
        no_gpu.setenv("HF_ENDPOINT", handle.url)
        choice = choose_model("linly-7b", verbose=False)  # probes HF_ENDPOINT: the mirror answers
        assert (choice.name, choice.source, choice.endpoint) == (
            "qwen2.5-0.5b-instruct", "hf", handle.url)
        chat = TransformersChat.load(choice, verbose=False)
        assert handle.stats.bytes_served > 0
    assert chat.prompt_format == "chat_template" and chat.name == "qwen2.5-0.5b-instruct"
    reply = chat.chat([{"role": "user", "content": "你好"}], max_new_tokens=4, temperature=0)
    assert isinstance(reply, str)
    assert local_model_dir("qwen2.5-0.5b-instruct") is not None  # next time: no download


@pytest.mark.parametrize(("gpu", "quantize", "expected"), [
    (None, None, ("float32", None)),
    ("T4", None, ("float16", None)),
    ("L4", None, ("bfloat16", None)),
    ("RTX 3070", None, ("bfloat16", "bitsandbytes")),
    ("GTX 1650", None, ("float16", "bitsandbytes")),  # fits neither: the smallest allowed
    ("L4", "4bit", ("bfloat16", "bitsandbytes")),  # DHLLM_QUANTIZE is followed
    ("RTX 3070", "none", ("bfloat16", None)),
])
def test_vllm_gets_the_precision_load_model_would_pick(isolated, gpu, quantize, expected):
    """One rule for both engines: vLLM's flags follow choose_precision, DHLLM_QUANTIZE included."""
    from helpers.hardware import detect_gpu
    from helpers.models import choose_precision
    from helpers.server.vllm.launch import vllm_precision

    if gpu is None:
        isolated.setattr(torch.cuda, "is_available", lambda: False)
    else:
        fake_gpu(isolated, *GPUS[gpu])
    spec = get_spec("linly-7b")
    assert vllm_precision(spec, quantize) == expected
    rule = choose_precision(spec, detect_gpu(), quantize)
    assert (rule.dtype, rule.quantize is not None) == (expected[0], expected[1] is not None)


def test_vllm_refuses_8bit_with_the_fix(isolated):
    from helpers.server.vllm import VLLMError
    from helpers.server.vllm.launch import vllm_precision

    fake_gpu(isolated, *GPUS["L4"])
    with pytest.raises(VLLMError, match="DHLLM_QUANTIZE=4bit"):
        vllm_precision(get_spec("linly-7b"), "8bit")
