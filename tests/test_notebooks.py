"""Notebook structure: badge, title, one identical setup cell, Chinese prose, stripped outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers.config import REPO_URL

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = ["01_download.ipynb", "02_linly_api.ipynb", "03_qwen.ipynb", "04_cloud_llms.ipynb",
         "05_digital_human.ipynb"]


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def setup_cell(path: Path) -> str:
    return next(source(c) for c in load(path) if c["cell_type"] == "code")


def test_the_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == NAMES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_structure(path: Path):
    cells = load(path)
    first = source(cells[0])
    assert f"colab.research.google.com/github/{REPO_URL.split('github.com/')[1]}/blob/main/notebooks/{path.name}" in first
    assert re.search(r"^# \S", first, re.M), "a title"
    markdown = "\n".join(source(c) for c in cells if c["cell_type"] == "markdown")
    for heading in ["## 你将学到", "## 准备工作", "## 小结"]:
        assert heading in markdown, heading
    chinese = len(re.findall(r"[\u4e00-\u9fff]", markdown))
    assert chinese > 400, "prose in Chinese"
    assert json.loads(path.read_text())["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stripped_and_nothing_asks_for_input(path: Path):
    for cell in load(path):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None
            assert not re.search(r"\bgetpass\b|\binput\(", source(cell))


def test_setup_cell_is_identical_and_uses_the_one_repository_address():
    cells = {setup_cell(p) for p in NOTEBOOKS}
    assert len(cells) == 1
    cell = cells.pop()
    assert f'REPO_URL = "{REPO_URL}"' in cell
    assert REPO_URL in (ROOT / "README.md").read_text(encoding="utf-8")


def test_notebooks_link_to_the_next():
    for path, following in zip(NOTEBOOKS, NAMES[1:] + NAMES[:1], strict=True):
        assert f"]({following})" in source(load(path)[-1])


def code_sources(path: Path) -> list[str]:
    return [source(c) for c in load(path) if c["cell_type"] == "code"]


def test_notebook_02_writes_the_chapters_server():
    """The chapter's server is the lesson: notebook 02 writes it out, it does not only import it."""
    cells = code_sources(ROOT / "notebooks" / "02_linly_api.ipynb")
    server = [c for c in cells if re.search(r'^@app\.post\("/"\)', c, re.M)]
    assert server, 'notebook 02 has no code cell defining @app.post("/")'
    for piece in ["app = FastAPI()", "await request.json()", "### Instruction:", "model.generate(",
                  "top_k=20", "repetition_penalty=1.15", "batch_decode", 'split("### Response:")']:
        assert piece in server[0], piece


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_with_folded_solutions(path: Path):
    markdown = "\n".join(source(c) for c in load(path) if c["cell_type"] == "markdown")
    assert "## 练习" in markdown
    assert markdown.count("<summary>参考答案</summary>") >= 2


def test_later_notebooks_keep_off_the_chapters_port():
    """Run 01 -> 04 in one JupyterLab: only notebook 02 serves on 7871; the others use their own."""
    from helpers.config import DEFAULT_PORT, NOTEBOOK_PORTS

    assert NOTEBOOK_PORTS["02"] == DEFAULT_PORT
    assert len(set(NOTEBOOK_PORTS.values())) == len(NOTEBOOK_PORTS)
    for name in ["03_qwen.ipynb", "04_cloud_llms.ipynb", "05_digital_human.ipynb"]:
        for cell in code_sources(ROOT / "notebooks" / name):
            assert str(DEFAULT_PORT) not in cell, f"{name} uses port {DEFAULT_PORT}:\n{cell}"
            for call in re.findall(r"serve_in_background\([^)]*\)", cell):
                assert "NOTEBOOK_PORTS[" in call, f"{name}: {call}"


PORT = re.compile(r"(?<![\d.,])(78[0-9]{2}|80[0-9]{2})(?![\d.])")
PORT_RANGE = re.compile(r"(\d{4})\s*[-–]\s*(\d{4})")


def ports_in(text: str) -> set[int]:
    """Port numbers named in ``text``; ranges such as ``7876–7878`` expanded."""
    found = {int(p) for p in PORT.findall(text)}
    for low, high in PORT_RANGE.findall(text):
        found |= set(range(int(low), int(high) + 1))
    return found


def ports_used(path: Path) -> set[int]:
    """The ports a notebook's code serves on or calls: NOTEBOOK_PORTS entries and literal numbers."""
    from helpers.config import NOTEBOOK_PORTS

    code = "\n".join(code_sources(path))
    keys = re.findall(r"""NOTEBOOK_PORTS\[["']([\w-]+)["']\]""", code)
    return {NOTEBOOK_PORTS[k] for k in keys} | ports_in(code)


def test_ports_in_notebooks_and_readme_agree_with_notebook_ports():
    """Each port a notebook or the README names is a configured one; what the README and notebook
    02 say each notebook uses is what that notebook's code uses."""
    from helpers.config import DEFAULT_MIRROR_PORT, NOTEBOOK_PORTS

    own_choice = 7880  # the README's example of picking another port when one is taken
    configured = set(NOTEBOOK_PORTS.values()) | {DEFAULT_MIRROR_PORT, own_choice}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name, text in [("README.md", readme)] + [
            (p.name, "\n".join(source(c) for c in load(p))) for p in NOTEBOOKS]:
        assert ports_in(text) <= configured, f"{name} names {ports_in(text) - configured}"
    used = {p.name[:2]: ports_used(p) - {DEFAULT_MIRROR_PORT} for p in NOTEBOOKS}
    assert used["01"] == set() and used["02"] == {NOTEBOOK_PORTS["02"]}
    for key, port in NOTEBOOK_PORTS.items():  # each notebook serves only on its own ports
        for number, ports in used.items():
            if port in ports:
                assert key.startswith(number), f"notebook {number} uses {port}, NOTEBOOK_PORTS[{key!r}]"

    listing = re.search(r"`helpers\.config\.NOTEBOOK_PORTS`: (.*?)\)\.", readme, re.S).group(1)
    said = {n: ports_in(t) for n, t in re.findall(r"(0[2-5]) → (.*?)(?=; 0[2-5] →|; the local|$)",
                                                  listing, re.S)}
    assert said == {n: used[n] for n in ("02", "03", "04", "05")}, listing
    bullet = re.search(r"^- Ports: (.*?)They live in", readme, re.S | re.M).group(1)
    for part in bullet.split(";"):
        if number := re.search(r"notebook (0[2-5])", part):
            assert ports_in(part) == used[number.group(1)], part
    intro = source(load(ROOT / "notebooks" / "02_linly_api.ipynb")[0])
    said = {n: ports_in(t) for n, t in re.findall(r"(0[3-5]) 用 ([\d–、和 （）vLLM]+)", intro)}
    assert said == {n: used[n] for n in ("03", "04", "05")}, intro


def test_notebook_05_is_for_learners_and_links_the_operations_guide():
    """Issue 23: 05 stays short; the project's goals and operations detail live in docs/scaling.md."""
    cells = load(ROOT / "notebooks" / "05_digital_human.ipynb")
    assert len(cells) <= 35, f"notebook 05 has {len(cells)} cells"
    text = "\n".join(source(c) for c in cells)
    assert "docs/scaling.md" in text
    for internal in ("本项目的目标", "原因尚未验证", "SIGKILL", "placements("):
        assert internal not in text, f"notebook 05 still shows {internal!r}"
    scaling = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    for moved in ("placements(2)", "signal.SIGKILL", "`retried` > 0", "## Measured"):
        assert moved in scaling, moved
