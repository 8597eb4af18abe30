"""Packed oneDNN linears (helpers/models/cpu_linear.py) on tiny random models: the same logits and
greedy tokens as PyTorch's own ``F.linear``, gradients where wanted, the memory cap, and the
engine's switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.models import cpu_linear
from helpers.models.cpu_linear import pack_cpu_linears

pytestmark = pytest.mark.skipif(not cpu_linear._kernels_agree(),
                                reason="this PyTorch build has no oneDNN packed linear")


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # Qwen2's q/k/v carry a bias, Llama's not
def test_packed_layers_give_the_same_logits_and_greedy_tokens(
        arch: str, tiny_model_dir: Path, tiny_llama_dir: Path) -> None:
    path = tiny_model_dir if arch == "qwen2" else tiny_llama_dir
    plain, packed = load(path), load(path)
    assert pack_cpu_linears(packed) == len(linears(packed)) > 0
    assert all(isinstance(m.forward, cpu_linear._PackedForward) for m in linears(packed))
    ids = torch.randint(3, plain.config.vocab_size, (3, 17))
    with torch.inference_mode():
        want, got = plain(input_ids=ids).logits, packed(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(packed.generate(ids, **greedy), plain.generate(ids, **greedy))


def test_with_gradients_the_layers_fall_back_and_train(tiny_llama_dir: Path) -> None:
    model = load(tiny_llama_dir)
    pack_cpu_linears(model)
    loss = model(input_ids=torch.randint(3, 100, (2, 9))).logits.sum()
    loss.backward()  # oneDNN's packed product has no backward: F.linear ran
    assert all(m.weight.grad is not None for m in linears(model))


def test_a_second_call_and_a_model_past_the_cap_pack_nothing(
        tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load(tiny_llama_dir)
    assert pack_cpu_linears(model) > 0
    assert pack_cpu_linears(model) == 0  # already packed
    monkeypatch.setattr(cpu_linear, "MAX_PACKED_BYTES", 1024)
    other = load(tiny_llama_dir)
    assert pack_cpu_linears(other) == 0
    assert not any(hasattr(m, "packed_weight") for m in linears(other))


def test_the_engine_packs_unless_told_not_to(tiny_llama_dir: Path) -> None:
    from helpers.server.engine.runner import ModelRunner

    kept, packed = load(tiny_llama_dir), load(tiny_llama_dir)
    ModelRunner(kept, 2, pack=False)
    ModelRunner(packed, 2, pack=True)
    assert not any(hasattr(m, "packed_weight") for m in linears(kept))
    assert all(hasattr(m, "packed_weight") for m in linears(packed))
