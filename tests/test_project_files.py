"""Project files stay in step: pyproject.toml vs environment.yml, make targets, CI script."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {r for r in pip_section if not r.startswith("-e")}
    assert {_name(r): r for r in listed} == {_name(r): r for r in wanted}
    assert "python=3.11" in env["dependencies"]
    # The claimed minimum is the Python the tests run on (this file needs tomllib, 3.11+).
    assert project["requires-python"] == ">=3.11"


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
