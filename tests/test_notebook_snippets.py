"""Copy-paste is a use: every fenced python/bash snippet in the notebooks' 小结 sections and in
the README's quick start runs as-is in a fresh process, against the services it names."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```(python|bash)\n(.*?)```", re.S)


def summary_snippets() -> list[tuple[str, str, str]]:
    """(id, language, code) for each fenced snippet in a 小结 cell or the README quick start."""
    found = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            text = "".join(cell["source"])
            if cell["cell_type"] == "markdown" and "## 小结" in text:
                for i, (lang, code) in enumerate(FENCE.findall(text)):
                    found.append((f"{path.stem}-{i}", lang, code))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    for i, (lang, code) in enumerate(FENCE.findall(quick)):
        found.append((f"README-{i}", lang, code))
    return found


SNIPPETS = summary_snippets()
# Snippets that set up the environment itself rather than call a service: run them elsewhere.
SETUP_COMMANDS = ("make ", "git clone", "pip install", "dhllm serve", "jupyter")


@pytest.fixture(scope="module")
def services(tmp_path_factory, embedded_chat):
    """The chapter's server on 7871 and 03's on 7872 (embedded model), a mirror on 8090, and the
    cloud fakes."""
    from helpers.hub.mirror import mirror_in_background
    from helpers.server import serve_in_background
    from helpers.stand_in import add_stand_in
    from tests.notebook_env import notebook_services

    root = tmp_path_factory.mktemp("mirror")
    for repo_id in ["Linly-AI/Chinese-LLaMA-2-7B-hf", "qwen/Qwen-1_8B-Chat"]:
        add_stand_in(root, repo_id)
    # The chapter's get_completion sends no max_length: keep CPU answers short (a snippet only has
    # to run and print an answer), as the notebooks' own test environment does.
    # 03's snippets call its own port, 7872: notebook 02's server may still hold 7871.
    with serve_in_background(embedded_chat, port=7871, default_max_new_tokens=16), \
            serve_in_background(embedded_chat, port=7872, default_max_new_tokens=16), \
            mirror_in_background(root, port=8090), notebook_services() as env:
        yield env


def test_there_are_snippets_in_every_summary():
    stems = {s[0].rsplit("-", 1)[0] for s in SNIPPETS}
    assert {"01_download", "02_linly_api", "03_qwen", "04_cloud_llms", "05_digital_human",
            "README"} <= stems


@pytest.mark.parametrize(("name", "lang", "code"), SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_snippet_runs_as_is(name, lang, code, services, tmp_path):
    if any(line.strip().startswith(SETUP_COMMANDS) for line in code.splitlines()):
        pytest.skip("installs or starts services: exercised by make test itself")
    env = {**os.environ, **services, "HF_HOME": str(tmp_path / "hf"),
           "MODELSCOPE_CACHE": str(tmp_path / "ms"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"{name} failed:\n{code}\n--- stderr ---\n{result.stderr[-3000:]}"
    check_output(name, result.stdout, result.stderr)


def check_output(name: str, stdout: str, stderr: str) -> None:
    """An exit code of 0 is not enough: `curl -s` exits 0 on a 422, a print may show an error."""
    assert stdout.strip(), f"{name} printed nothing"
    assert "Traceback" not in stderr, f"{name}:\n{stderr[-3000:]}"
    assert "\ufffd" not in stdout, f"{name} printed broken UTF-8: {stdout[:500]}"
    for line in stdout.splitlines():
        if line.lstrip().startswith("{"):  # a JSON reply of one of our servers
            body = json.loads(line)
            assert "detail" not in body and "error" not in body, f"{name} got an error: {line}"
            assert {"response", "choices", "data"} & set(body), f"{name}: unexpected {line}"
