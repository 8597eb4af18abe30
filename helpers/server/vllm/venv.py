"""Finding a Python that has vLLM (or vllm-router): vLLM lives in a venv of its own.

vLLM pins its own torch, transformers and fastapi, so it cannot share dhllm's venv: setup puts
it in ``.venv-vllm`` (``make vllm``), a learner may point ``DHLLM_VLLM_PYTHON`` at another, or
have ``vllm`` on PATH. Standard library only.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

# helpers/server/vllm/venv.py -> repository root, where setup puts .venv-vllm.
_REPO_ROOT = Path(__file__).resolve().parents[3]
ENV_VAR = "DHLLM_VLLM_PYTHON"


class VLLMError(RuntimeError):
    """vLLM could not be found, did not start, or died; the message carries the log's tail."""


# ---------------------------------------------------------------------------------------------
# Finding a Python that has vLLM
# ---------------------------------------------------------------------------------------------


def has_module(python: Path, module: str = "vllm", timeout: float = 20.0) -> bool:
    """Whether ``python`` can find ``module`` (without importing it)."""
    if not (python.is_file() and os.access(python, os.X_OK)):
        return False
    # find_spec costs ~30 ms in a subprocess; `import vllm` would cost ~5 s (it imports torch).
    code = f"import importlib.util as u, sys; sys.exit(0 if u.find_spec({module!r}) else 1)"
    try:
        done = subprocess.run(
            [str(python), "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def python_in(path: Path) -> Path:
    """Accept either an interpreter or a venv folder; return the interpreter path."""
    if path.is_dir():
        for name in ("bin/python", "bin/python3", "Scripts/python.exe"):
            if (path / name).exists():
                return path / name
    return path


def _shebang_python(script: Path) -> Path | None:
    """The interpreter named by a console script's shebang (pip's /bin/sh trick included)."""
    try:
        with script.open("rb") as fh:
            head = fh.read(1024).decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    if not head or not head[0].startswith("#!"):
        return None
    first = shlex.split(head[0][2:].strip() or "x")
    if first and Path(first[0]).name.startswith("python"):
        return Path(first[0])
    # pip writes `#!/bin/sh` + `'''exec' "/long path/python" "$0" "$@"` for paths a shebang
    # cannot hold (spaces, > 127 bytes).
    if len(head) > 1 and head[1].startswith("'''exec'"):
        parts = shlex.split(head[1][len("'''exec'") :])
        if parts:
            return Path(parts[0])
    return None


def find_vllm_python(setting: str | None = None) -> Path | None:
    """Find a Python with vLLM: ``setting``, then the repo's ``.venv-vllm``, then ``vllm`` on PATH.

    ``setting`` "none" means: never use vLLM here, even where it is installed (it takes ~5 GB of
    RAM and a minute to start; a notebook then takes its no-vLLM path).
    """
    if setting and setting.strip().lower() == "none":
        return None
    if setting:
        # An explicit choice that is wrong is an error, not something to silently route around.
        python = python_in(Path(setting).expanduser())
        if not has_module(python):
            raise VLLMError(
                f"{ENV_VAR}={setting!r}: {python} is not a Python interpreter with vLLM installed"
            )
        return python
    # Never .resolve() a venv's python: it is a symlink to the base interpreter, which has no vLLM.
    own = _REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if has_module(own):
        return own
    script = shutil.which("vllm")
    if script:
        python = _shebang_python(Path(script)) or Path(script).with_name("python")
        if has_module(python):
            return python
    return None


if __name__ == "__main__":  # pragma: no cover - manual check: python -m helpers.server.vllm.venv
    import sys

    found = find_vllm_python(os.environ.get(ENV_VAR))
    print(found or "vLLM not found", file=sys.stderr)
