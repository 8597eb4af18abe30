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
    assert len(cells("02_linly_api.ipynb")) <= 32
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
    assert "OpenAI(base_url=base_url, api_key=get_secret(preset.key_env))" in code
    assert "gpt or gemini" not in code and "clouds_with_keys()" in code
    assert "vllm" not in code.lower()  # vLLM and parallelism live in notebook 05
