"""Project files stay in step: pyproject.toml vs environment.yml, make targets, CI script."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def extra(project: dict, name: str) -> set[str]:
    """The requirements of extra ``name``, with self-references (``dhllm[lab]``) expanded."""
    found = set()
    for requirement in project["optional-dependencies"][name]:
        own = re.fullmatch(r"dhllm\[(\w+)\]", requirement)
        found |= extra(project, own.group(1)) if own else {requirement}
    return found


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | extra(project, "dev")
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {r for r in pip_section if not r.startswith("-e")}
    assert {_name(r): r for r in listed} == {_name(r): r for r in wanted}
    assert "python=3.11" in env["dependencies"]
    # The claimed minimum is the Python the tests run on (this file needs tomllib, 3.11+).
    assert project["requires-python"] == ">=3.11"


LAB_AND_TEST_TOOLS = {"jupyterlab", "nbval", "pytest", "pytest-xdist", "ruff", "schemathesis",
                      "playwright", "nbclient", "nbformat"}


def test_colab_gets_no_jupyterlab_nor_test_tools_and_make_still_does():
    """Issue 23: the setup cell's `pip install dhllm` must not upgrade Colab's own Jupyter; the
    [lab] and [dev] extras carry them, and `make setup` and the README install [dev]."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(r) for r in project["dependencies"]}
    assert not base & LAB_AND_TEST_TOOLS, base & LAB_AND_TEST_TOOLS
    assert "jupyterlab" in {_name(r) for r in extra(project, "lab")}
    assert {_name(r) for r in extra(project, "dev")} >= LAB_AND_TEST_TOOLS
    assert '-m pip install -q -e ".[dev]"' in (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count('pip install -e ".[dev]"') >= 2  # Linux/macOS and Windows set-up


def test_ci_runs_exactly_make_test():
    script = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script
    commands = [ln.strip() for ln in script.splitlines() if ln.strip().startswith(("make", "pytest"))]
    assert commands == ["make test"]


def test_makefile_has_the_readme_targets():
    makefile = (ROOT / "Makefile").read_text()
    for target in ["setup", "lab", "serve", "test", "e2e", "bench"]:
        assert re.search(rf"^{target}:", makefile, re.M), target
    # torch before the project, so pip never pulls the multi-GB CUDA build.
    assert makefile.index("torch==2.13.0") < makefile.index('-e ".[dev]"')
