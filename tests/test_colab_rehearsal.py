"""Issue 7: a Colab rehearsal. Colab has no checkout: the notebooks' setup cell pip-installs
``dhllm @ git+REPO_URL`` and everything else must come from that installed package.

Here: a fresh venv; the setup cell itself, run with REPO_URL pointed at a fresh clone of HEAD;
then, per notebook, a smoke run in an empty folder outside the repository on that venv's kernel:
the setup cell, every import the notebook makes, and a check that nothing came from the checkout.
The notebooks' other cells run twice elsewhere (nbval and the browser test); running them a third
time here cost ~2 minutes and found nothing those runs miss. What only this test can see is the
installed package: a module, a data file or a dependency that exists only in the checkout fails an
import or the isolation check here. Like Colab (torch, transformers... preinstalled) the venv sees the third-party packages
already installed in the test's venv, but not its editable dhllm, and pip runs with --no-index:
only dhllm itself is installed, offline.

The package comes from HEAD (commit what the notebooks need); the notebooks from the working tree.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from helpers.config import REPO_URL
from tests.notebook_env import notebook_services

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300
KERNEL = "dhllm-colab-rehearsal"


@dataclass
class ColabVenv:
    """The rehearsal environment: a venv with dhllm from git, and a kernelspec for it."""

    python: Path
    kernels: Path
    site_packages: Path
    env: dict[str, str]


def setup_cell() -> str:
    """The notebooks' setup cell (identical in all of them; tests/test_notebooks.py checks that)."""
    nb = nbformat.read(REPO / "notebooks" / NOTEBOOKS[0], as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


def import_lines(nb: nbformat.NotebookNode) -> list[str]:
    """Every top-level import statement of the notebook's code cells, in order, once each."""
    found: dict[str, None] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:  # IPython syntax (!cmd, %magic): only its plain-Python lines count
            tree = ast.parse("\n".join(line for line in cell.source.splitlines()
                                        if line.startswith(("import ", "from "))))
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not (
                    isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                found[ast.unparse(node)] = None
    return list(found)


def smoke_notebook(name: str) -> nbformat.NotebookNode:
    """The setup cell, then one cell with every import of ``name``: what must come from the package."""
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    imports = import_lines(nb)
    assert any("helpers" in line for line in imports), f"{name} imports nothing from helpers"
    cells = [nbformat.v4.new_code_cell(setup_cell()),
             nbformat.v4.new_code_cell("\n".join(imports) + f"\nprint('imports: {len(imports)}')")]
    return nbformat.v4.new_notebook(cells=cells, metadata=nb.metadata)


def shared_site_packages(target: Path) -> Path:
    """Links to every installed package of this venv except dhllm itself (our editable install).

    Listed in a .pth file, a folder's own .pth files are not run, so the editable finder that
    maps ``helpers`` to the checkout stays inactive; we leave it and dhllm's metadata out anyway.
    """
    source = Path(sysconfig.get_paths()["purelib"])
    dhllm = importlib.metadata.distribution("dhllm")
    ours = {Path(str(f)).parts[0] for f in dhllm.files or []}
    target.mkdir()
    for entry in source.iterdir():
        name = entry.name
        if (name in ours or name.endswith(".pth") or name == "__pycache__"
                or name.startswith(("__editable__", "dhllm-", "dhllm.")) or name == "helpers"):
            continue
        (target / name).symlink_to(entry)
    return target


@pytest.fixture(scope="session")
def colab_venv(tmp_path_factory: pytest.TempPathFactory) -> ColabVenv:
    """Fresh venv + the setup cell run with REPO_URL pointed at a fresh clone of HEAD."""
    base = tmp_path_factory.mktemp("colab")
    clone = base / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    (site / "_colab_preinstalled.pth").write_text(f"{shared_site_packages(base / 'preinstalled')}\n")
    # Colab's preinstalled huggingface_hub puts `hf` on PATH too: notebooks run `!hf download`.
    (hf,) = importlib.metadata.entry_points(group="console_scripts", name="hf")
    launcher = venv / "bin" / "hf"
    launcher.write_text(f"#!{python}\nimport sys\nfrom {hf.module} import {hf.attr}\n"
                        f"sys.exit({hf.attr}())\n")
    launcher.chmod(0o755)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    ours = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        [str(venv / "bin")] + [p for p in env.get("PATH", "").split(os.pathsep) if p != ours])
    env["VIRTUAL_ENV"] = str(venv)
    probe = "import importlib.util as u; s = u.find_spec('helpers'); print(s and s.origin)"
    before = subprocess.run([str(python), "-c", probe], cwd=base, env=env, check=True,
                            capture_output=True, text=True).stdout.strip()
    assert before == "None", f"the fresh venv already sees a helpers package: {before}"

    cell = setup_cell()
    assert f'REPO_URL = "{REPO_URL}"' in cell
    cell = cell.replace(f'REPO_URL = "{REPO_URL}"', f'REPO_URL = "file://{clone}"')
    # Offline: --no-index proves every dependency is already satisfied, and without an index the
    # build backend comes from the preinstalled packages (PIP_NO_BUILD_ISOLATION=0 turns isolation
    # *off*; pip's negative options read that way).
    pip_env = {**env, "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",
               "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run([str(python), "-c", cell], cwd=base, env=pip_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the setup cell failed:\n{result.stdout}\n{result.stderr}"

    after = subprocess.run([str(python), "-c", probe], cwd=base, env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    assert Path(after).is_relative_to(site), f"helpers imported from {after}, not the fresh venv"

    kernels = base / "kernels"
    (kernels / KERNEL).mkdir(parents=True)
    (kernels / KERNEL / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Colab rehearsal", "language": "python",
    }))
    return ColabVenv(python=python, kernels=kernels, site_packages=site, env=env)


def isolation_check(site_packages: Path) -> str:
    """A last cell: helpers came from the fresh venv and nothing was imported from the checkout."""
    preinstalled = os.path.realpath(sys.prefix)  # shared third-party packages resolve into it
    return f"""
import os, sys
import helpers
assert helpers.__file__.startswith({str(site_packages)!r}), helpers.__file__
repo, shared = {str(REPO)!r} + os.sep, {preinstalled!r} + os.sep
def _from_checkout(path):
    real = os.path.realpath(path)
    return real.startswith(repo) and not real.startswith(shared)
leaked = sorted(n for n, m in list(sys.modules.items())
                if getattr(m, "__file__", None) and _from_checkout(m.__file__))
assert not leaked, f"imported from the checkout: {{leaked}}"
assert not [p for p in sys.path if p and _from_checkout(p)], sys.path
assert not _from_checkout(os.getcwd()), os.getcwd()
print("isolated:", helpers.__file__)
"""


def test_notebooks_use_no_file_of_the_checkout() -> None:
    """A Colab runtime has the notebook alone: no code cell may reach into the repository."""
    for name in NOTEBOOKS:
        nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not re.search(r"\.\./|sys\.path\.(append|insert)|parents\[\d\]", cell.source), \
                    f"{name} reaches outside its folder:\n{cell.source}"


def test_the_setup_cell_pulls_no_jupyterlab_nor_test_tools(colab_venv: ColabVenv) -> None:
    """Issue 23: what the setup cell installed asks for no jupyterlab, nbval or test tool (they
    would upgrade Colab's own Jupyter under the running kernel): read from the installed
    package's metadata in the fresh venv, every such requirement carries an ``extra`` marker."""
    script = ("import importlib.metadata as m, json; "
              "print(json.dumps(m.requires('dhllm') or []))")
    requires = json.loads(subprocess.run(
        [str(colab_venv.python), "-c", script], env=colab_venv.env, check=True,
        capture_output=True, text=True).stdout)
    unconditional = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower()
                     for r in requires if "extra ==" not in r}
    assert "openai" in unconditional  # the metadata is there and lists the base dependencies
    assert not unconditional & {"jupyterlab", "nbval", "pytest", "ruff", "playwright"}, requires
    assert any(r.startswith("jupyterlab") and 'extra == "lab"' in r for r in requires), requires


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_imports_like_on_colab(name: str, colab_venv: ColabVenv,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp(f"colab-{name.split('_')[0]}")  # empty, outside the repo
    nb = smoke_notebook(name)
    nbformat.write(nb, folder / name)
    nb.cells.append(nbformat.v4.new_code_cell(isolation_check(colab_venv.site_packages)))
    km = KernelManager(kernel_name=KERNEL,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(colab_venv.kernels)]))
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(folder)}})
    with notebook_services() as services:
        try:
            client.execute(env={**colab_venv.env, **services})
        except CellExecutionError as err:
            nbformat.write(nb, folder / f"executed-{name}")  # every output up to the failure
            plain = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # IPython colours its tracebacks
            pytest.fail(f"{name} failed outside the checkout (outputs so far: "
                        f"{folder / f'executed-{name}'}):\n{plain}", pytrace=False)
        finally:
            # nbclient shuts down only kernels it started itself: ours would outlive the test.
            if km.has_kernel:
                km.shutdown_kernel(now=True)
    last = nb.cells[-1].outputs
    assert any("isolated:" in out.get("text", "") for out in last), last
