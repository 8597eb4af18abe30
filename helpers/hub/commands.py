"""The shell command for a download (bash or PowerShell), copy-paste ready, with today's tools."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from helpers.hub.sources import (
    HF_ENDPOINT,
    MODELSCOPE_ENDPOINT,
    Shell,
    Source,
    endpoint_for,
    git_url,
)


def _quote(text: str, shell: str) -> str:
    if shell == "powershell":
        return text if re.fullmatch(r"[\w./:\\-]+", text) else "'" + text.replace("'", "''") + "'"
    return shlex.quote(text)


def download_command(
    repo_id: str,
    source: Source = "hf",
    local_dir: str | Path | None = None,
    shell: Shell = "bash",
    endpoint: str | None = None,
    revision: str | None = None,
    include: str | None = None,
) -> str:
    """The shell command that does the same download with the installed tools (copy-paste ready)."""
    if shell not in ("bash", "powershell"):
        raise ValueError(f"shell must be 'bash' or 'powershell', not {shell!r}")
    hub_id = repo_id
    target = str(local_dir) if local_dir is not None else hub_id.split("/")[-1]
    base = endpoint_for(source, endpoint)
    q = lambda text: _quote(text, shell)  # noqa: E731
    # Both hub CLIs take the same arguments; they differ in name, default address and variable.
    hub_cli = {
        "hf": ("hf", HF_ENDPOINT, "HF_ENDPOINT"),
        "hf-mirror": ("hf", HF_ENDPOINT, "HF_ENDPOINT"),
        "modelscope": ("modelscope", MODELSCOPE_ENDPOINT, "MODELSCOPE_ENDPOINT"),
    }
    if source in hub_cli:
        program, default_base, variable = hub_cli[source]
        cmd = f"{program} download {q(hub_id)} --local-dir {q(target)}"
        if revision:
            cmd += f" --revision {q(revision)}"
        if include:
            cmd += f" --include {q(include)}"
        if base == default_base:
            return cmd
        if shell == "powershell":
            return f'$env:{variable} = "{base}"\n{cmd}'
        return f"{variable}={q(base)} {cmd}"
    branch = f" --branch {q(revision)}" if revision else ""
    return f"git lfs install\ngit clone{branch} {q(git_url(hub_id, base))} {q(target)}"
