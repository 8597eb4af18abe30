"""Where models come from: the hubs' addresses, ids and local folders. No network beyond a probe."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from helpers.config import get_settings

Source = Literal["hf", "hf-mirror", "modelscope", "git"]
Shell = Literal["bash", "powershell"]

HF_ENDPOINT = "https://huggingface.co"
HF_MIRROR_ENDPOINT = "https://hf-mirror.com"
MODELSCOPE_ENDPOINT = "https://www.modelscope.cn"
SOURCES: tuple[str, ...] = ("hf", "hf-mirror", "modelscope", "git")


def endpoint_for(source: str, endpoint: str | None = None) -> str:
    """The base URL for ``source``; an explicit ``endpoint`` wins."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if endpoint:
        return endpoint.rstrip("/")
    return {
        "hf": HF_ENDPOINT,
        "hf-mirror": HF_MIRROR_ENDPOINT,
        "modelscope": MODELSCOPE_ENDPOINT,
        "git": HF_ENDPOINT,
    }[source]



def default_local_dir(repo_id: str) -> Path:
    """``<cache_dir>/downloads/<org>/<name>``: a plain folder, like ``hf download --local-dir``."""
    return get_settings().resolved_cache_dir() / "downloads" / Path(*repo_id.split("/"))


def org_name(hub_id: str) -> str:
    """``org/name`` of an id or a git URL (``https://host/org/name.git`` -> ``org/name``)."""
    parts = [p for p in re.split(r"[/\\]", hub_id.removesuffix(".git")) if p]
    return "/".join(parts[-2:])


def git_url(repo_id: str, base: str) -> str:
    if re.match(r"^(https?|ssh|file|git)://", repo_id) or Path(repo_id).is_absolute():
        return repo_id
    return f"{base}/{repo_id}"



def hub_reachable(source_or_url: str = "hf", timeout: float = 2.0) -> bool:
    """True if the hub answers HTTP within ``timeout`` seconds (any status below 500)."""
    import requests

    url = source_or_url if "://" in source_or_url else endpoint_for(source_or_url)
    try:
        return requests.head(url, timeout=timeout, allow_redirects=False).status_code < 500
    except requests.RequestException:
        return False
