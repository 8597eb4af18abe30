"""Every `!` shell command a notebook runs, rendered as it would run on Windows (cmd.exe) and on
Linux, and every Windows snippet the notebooks and README show: quoting that cmd.exe and
PowerShell accept, and the same UTF-8 JSON body on both systems.

Jupyter's `!` runs cmd.exe on Windows: it has no single quotes, it has no `VAR=value command`
form, and text on its command line goes out in the console code page. In PowerShell `curl` is
an alias of Invoke-WebRequest unless `curl.exe` is named.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import json
import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from IPython.core.inputtransformer2 import TransformerManager
from IPython.utils.text import DollarFormatter

from tests.shell_args import windows_argv

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def shell_cells(path: Path) -> list[str]:
    """The code cells of a notebook that run a `!` command."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return [s for s in sources if re.search(r"^\s*!", s, re.M)]


class Names(dict):
    """A cell's namespace: names the test sets, anything else a harmless stand-in."""

    def __missing__(self, name: str) -> object:
        if hasattr(builtins, name):  # let the lookup go on to the builtins
            raise KeyError(name)
        return mock.MagicMock(name=name)


def render(cell: str, platform: str, tmp_path: Path) -> list[str]:
    """The shell commands a cell runs on ``platform``, offline (local mirror) and online."""
    return [c for online in (False, True) for c in render_once(cell, platform, tmp_path, online)]


def render_once(cell: str, platform: str, tmp_path: Path, online: bool) -> list[str]:
    """Run a cell with `sys.platform` set to ``platform``; return the shell commands it runs."""
    python = TransformerManager().transform_cell(cell)
    commands: list[str] = []
    names = Names()

    def system(command: str) -> None:
        # As IPython's var_expand: {name} from the cell's namespace, else the text as is.
        with contextlib.suppress(Exception):
            command = DollarFormatter().vformat(command, args=[], kwargs=names)
        commands.append(command)
        args = windows_argv(command) if platform == "win32" else shlex.split(command)
        if "-o" in args:  # what curl would have written
            Path(args[args.index("-o") + 1]).write_text('{"response": "…"}', encoding="utf-8")
        if "--local-dir" in args:  # what hf download would have made
            Path(args[args.index("--local-dir") + 1]).mkdir(parents=True, exist_ok=True)

    names.update(
        get_ipython=lambda: SimpleNamespace(system=system),
        # Notebook 01/03's variables: the offline path (local mirror, git-lfs present).
        ONLINE=online, FULL_DOWNLOAD=False, HAVE_GIT=True, HAVE_LFS=True, POINTERS_ONLY=online,
        HF_ENDPOINT="http://127.0.0.1:8090", LINLY="Linly-AI/Chinese-LLaMA-2-7B-hf",
        QWEN_HF="Qwen/Qwen-1_8B-Chat", INCLUDE="", ONLY="", WORKDIR=tmp_path / "work",
        clone_dir=tmp_path / "clone", pointer_dir=tmp_path / "pointers", hf_dir=tmp_path / "hf",
        git_dir=tmp_path / "git", Path=Path, sys=sys,
    )
    for folder in ("clone", "pointers", "hf", "git"):  # the folders earlier cells made
        (tmp_path / folder).mkdir(exist_ok=True)
    with mock.patch.object(sys, "platform", platform), \
            mock.patch("tempfile.gettempdir", return_value=str(tmp_path)):
        exec(compile(ast.parse(python), "<cell>", "exec"), {"__builtins__": builtins}, names)
    return commands


def body_sent(command: str, tmp_path: Path, windows: bool) -> dict | None:
    """The JSON body a curl command sends (read from its file for `@file`), or None."""
    args = windows_argv(command) if windows else shlex.split(command)
    for flag, value in zip(args, args[1:], strict=False):
        if flag in ("-d", "--data", "--data-binary", "--data-raw"):
            text = Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
            return json.loads(text)
    return None


CELLS = [(path.name, i, cell) for path in NOTEBOOKS for i, cell in enumerate(shell_cells(path))]


def test_the_notebooks_have_shell_cells_where_learners_meet_them():
    names = {name for name, _, _ in CELLS}
    assert {"01_download.ipynb", "02_linly_api.ipynb", "03_qwen.ipynb", "04_cloud_llms.ipynb"} <= names


@pytest.mark.parametrize(("name", "index", "cell"), CELLS, ids=[f"{n}-{i}" for n, i, _ in CELLS])
def test_shell_cell_on_windows(name: str, index: int, cell: str, tmp_path: Path):
    windows = render(cell, "win32", tmp_path)
    assert windows, f"{name}: the cell runs no command on Windows"
    for command in windows:
        assert "'" not in command, f"cmd.exe has no single quotes: {command}"
        assert not re.match(r"^\w+=\S*\s", command), f"cmd.exe has no `VAR=value command`: {command}"
        assert not re.match(r"^curl\s", command), f"name curl.exe (PowerShell's curl is an alias): {command}"
        assert command.isascii() or "curl" not in command, f"Chinese on cmd's command line: {command}"
    linux = render(cell, "linux", tmp_path)
    sent = [(body_sent(c, tmp_path, True), c) for c in windows if c.startswith("curl")]
    expected = [body_sent(c, tmp_path, False) for c in linux if c.startswith("curl")]
    assert [body for body, _ in sent] == expected, f"{name}: Windows and Linux send different JSON"
    for body, command in sent:
        assert body == {"prompt": "如何应对压力"}, command


FENCE = re.compile(r"```(bat|powershell)\n(.*?)```", re.S)


def windows_snippets() -> list[tuple[str, str, str]]:
    texts = [("README", (ROOT / "README.md").read_text(encoding="utf-8"))]
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        texts += [(path.stem, "".join(c["source"])) for c in cells if c["cell_type"] == "markdown"]
    return [(f"{where}-{i}", lang, code) for where, text in texts
            for i, (lang, code) in enumerate(FENCE.findall(text))]


SNIPPETS = windows_snippets()


@pytest.mark.parametrize(("name", "lang", "code"), SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_windows_snippets_quote_for_their_shell(name: str, lang: str, code: str):
    for line in code.splitlines():
        words = line.split()
        if lang == "bat":
            assert "'" not in line, f"{name}: cmd.exe has no single quotes: {line}"
            if words[:1] == ["curl"] or words[:1] == ["curl.exe"]:
                body = body_sent(line, Path("."), True) if "@" not in line else None
                if body is not None:
                    assert body["prompt"] == "如何应对压力", line
        else:
            assert "curl" not in words[:1], f"{name}: PowerShell's curl is Invoke-WebRequest: {line}"
