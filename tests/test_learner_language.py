"""Issue 23: what a learner reads is in Chinese (English after it is fine).

Two parts: the messages helpers/ prints or raises into a notebook, produced for real here (the
set-up cell's lines, the doctor, download and verification errors, missing keys, cloud errors,
the model choice), and the string literals of every notebook's own ``print`` calls.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from IPython.core.inputtransformer2 import TransformerManager

from helpers import doctor
from helpers.hardware import Gpu
from tests.learner_text import english_sentences

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_checker_tells_a_sentence_from_names_and_code() -> None:
    assert english_sentences("port 7871 on 127.0.0.1 is already in use by another process")
    assert english_sentences("[torch] 中文在前 / torch is not installed on this machine") == []
    assert english_sentences("NVIDIA GeForce RTX 3070 (8.0 GiB)") == []
    assert english_sentences("choose_model('linly-7b') -> linly-7b, float16") == []
    assert english_sentences("export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1") == []


def helper_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """Each learner-facing message helpers/ produces, made for real, by where it comes from."""
    from helpers.background_server import port_in_use_message
    from helpers.chat import get_chat_model
    from helpers.chat.cloud_common import no_answer_message, status_error
    from helpers.hub import GIT_LFS_MISSING, verify
    from helpers.hub.files import VerificationError
    from helpers.models import UnsupportedModelError, choose_model, describe_environment
    from helpers.secrets import MissingSecretError

    found = {"describe_environment": describe_environment(online=False),
             "GIT_LFS_MISSING": GIT_LFS_MISSING,
             "MissingSecretError": str(MissingSecretError("OPENAI_API_KEY")),
             "port_in_use_message": port_in_use_message("127.0.0.1", 7871)}
    choose_model("linly-7b", online=False)
    found["choose_model"] = capsys.readouterr().out
    try:
        get_chat_model("local:chatglm3-6b")
    except UnsupportedModelError as err:
        found["UnsupportedModelError"] = str(err)
    pointer = tmp_path / "lfs"
    pointer.mkdir()
    (pointer / "config.json").write_text("{}")
    (pointer / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123\n")
    for name, folder in [("VerificationError (pointer)", pointer),
                         ("VerificationError (no folder)", tmp_path / "missing"),
                         ("VerificationError (no config)", tmp_path)]:
        with pytest.raises(VerificationError) as info:
            verify(folder, quick=True)
        found[name] = str(info.value)
    for status in (401, 404, 429, 503, 400):
        found[f"status_error {status}"] = str(status_error(
            status, "openai:gpt-6-luna at https://api.openai.com/v1", "The provider's own words.",
            None, "OPENAI_API_KEY"))
    from helpers.hub.download import _hub_error

    found["DownloadError"] = str(_hub_error(OSError("Connection refused"), "org/x",
                                            "https://hf-mirror.com"))
    found["DownloadError (404)"] = str(_hub_error(OSError("404 Client Error"), "org/x",
                                                  "https://hf-mirror.com"))
    for provider in ("openai", "deepseek", "dhllm"):
        found[f"no_answer_message {provider}"] = no_answer_message(provider, provider, 60)
    findings = [doctor.check_torch(None, None), doctor.check_python((3, 9, 0), ">=3.11"),
                doctor.check_disk(tmp_path, 1e15, "linly-7b"),
                doctor.check_torch(doctor.TorchBuild("2.13.0", None, False),
                                   doctor.Smi([("NVIDIA GeForce RTX 3070", 8192.0)], "12.4")),
                *doctor.check_gpu_memory(Gpu("NVIDIA GeForce RTX 3070", 8.0, (8, 6)), False),
                *doctor.check_gpu_memory(None), *doctor.check_colab(True, False),
                *doctor.check_hubs([("HF_ENDPOINT", "http://127.0.0.1:9")], timeout=0.5)]
    found["doctor report"] = doctor.report(findings)
    found["doctor lines"] = "\n".join(f.line() for f in findings)
    return found


def test_helper_messages_are_chinese_first(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("DHLLM_OFFLINE", raising=False)
    messages = helper_messages(tmp_path, capsys)
    assert len(messages) >= 21
    english = {where: english_sentences(text) for where, text in messages.items()}
    assert not {k: v for k, v in english.items() if v}, english


def print_literals(notebook: Path) -> list[str]:
    """The text of every ``print(...)`` in the notebook's code cells: string literals and the
    literal parts of f-strings (placeholders dropped: values are fine)."""
    found = []
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "code":
            continue
        # IPython's own transformer turns `!cmd` and `%magic` (in branches too) into Python.
        python = TransformerManager().transform_cell("".join(cell["source"]))
        for node in ast.walk(ast.parse(python)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "print":
                parts = [part.value for arg in node.args for part in ast.walk(arg)
                         if isinstance(part, ast.Constant) and isinstance(part.value, str)]
                found.append(" ".join(parts))
    return found


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda nb: nb.stem)
def test_notebook_prints_are_chinese(notebook: Path) -> None:
    literals = print_literals(notebook)
    assert literals, f"{notebook.name} prints nothing?"
    english = [(text, english_sentences(text)) for text in literals if english_sentences(text)]
    assert not english, english


GLOSSARY = ROOT / "docs" / "glossary.md"
# Issue 23's terms: the one to use, and the words it replaces.
TERMS = {"替代模型": "替身", "模型注册表": "模型登记表", "本地克隆的仓库": "本地检出", "原教程": "章节",
         "实际运行": "真的运行", "API 密钥": "API Key", "模型托管平台": "模型库"}
MORE_TERMS = ["量化", "显存", "KV 缓存", "连续批处理", "流式输出"]


def test_the_glossary_has_one_row_per_term() -> None:
    rows = [line for line in GLOSSARY.read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and not line.startswith("| 中文")]
    firsts = [row.split("|")[1] for row in rows]
    for term in [*TERMS, *MORE_TERMS]:
        assert sum(term in first for first in firsts) == 1, term
    assert all(row.count("|") == 4 for row in rows), "three columns: 中文, English, meaning"


def test_notebook_04_and_helper_messages_use_the_glossarys_terms() -> None:
    """The replaced words are gone from notebook 04 (but for the set-up cell, identical in all
    five notebooks and changed with them) and from helpers/ string literals."""
    cells = json.loads((ROOT / "notebooks" / "04_cloud_llms.ipynb").read_text(encoding="utf-8"))
    text = "\n".join("".join(c["source"]) for c in cells["cells"][1:] if not "".join(
        c["source"]).startswith("# 准备工作（每个 notebook 完全相同）"))
    text += "".join(cells["cells"][0]["source"])
    literals = [node.value for path in (ROOT / "helpers").rglob("*.py")
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    for old in TERMS.values():
        if old == "API Key":
            continue  # English literals in helpers/ may say "API key"; the notebook may not
        assert old not in text, old
        assert not [s for s in literals if old in s], old
    assert "API Key" not in text
