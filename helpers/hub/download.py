"""``download``: a model folder from Hugging Face, hf-mirror, ModelScope or git, then ``verify``.

Layout: a plain folder (``local_dir``, by default ``<cache_dir>/downloads/<org>/<name>``), the
layout of ``hf download --local-dir``: one folder per model that ``from_pretrained``, ``verify``
and the local mirror can all use as is.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
from pathlib import Path

from helpers.hub.files import RESUME_MIN_SIZE, DownloadError, local_hash_cache
from helpers.hub.resume import fetch_resumable, url_path
from helpers.hub.sources import Source, default_local_dir, endpoint_for, git_url, org_name
from helpers.hub.verify import verify


def download(
    repo_id: str,
    source: Source = "hf",
    local_dir: str | Path | None = None,
    revision: str | None = None,
    allow_patterns: list[str] | str | None = None,
    endpoint: str | None = None,
    progress: bool = True,
) -> Path:
    """Download a model folder from a hub (or git), resuming partial files; verify; return it."""
    base = endpoint_for(source, endpoint)
    hub_id = repo_id
    if local_dir is None:
        local_dir = default_local_dir(org_name(hub_id))
    local_dir = Path(local_dir).expanduser()
    local_dir.mkdir(parents=True, exist_ok=True)
    if source == "git":
        if allow_patterns is not None:
            raise ValueError("allow_patterns is not supported with source='git'; use source='hf'")
        _download_git(hub_id, local_dir, revision, base)
        return verify(local_dir, quick=False, source="git")
    if source == "modelscope":
        _download_modelscope(hub_id, local_dir, revision, allow_patterns, base, progress)
    else:
        _download_hf(hub_id, local_dir, revision, allow_patterns, base, progress)
    return verify(
        local_dir,
        hub_id,
        endpoint=base,
        source=source,
        revision=revision,
        allow_patterns=allow_patterns,
    )


def _hub_error(exc: Exception, hub_id: str, base: str) -> DownloadError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    name = type(exc).__name__
    if "NotFound" in name or "404" in text:
        return DownloadError(
            f"{base} 上找不到 {hub_id}。检查模型 id：ModelScope 的 id 和 Hugging Face 的可能不同"
            f"（例如 qwen/Qwen-1_8B-Chat 与 Qwen/Qwen-1_8B-Chat）。 / {hub_id} was not found on "
            f"{base} ({text})"
        )
    return DownloadError(
        f"无法从 {base} 下载 {hub_id}。连不上这个模型托管平台时，试试 source='hf-mirror' 或 "
        f"'modelscope'，或者本地镜像（dhllm mirror serve）。 / cannot download {hub_id} from "
        f"{base}: {name}: {text}"
    )


def _download_hf(
    hub_id: str,
    local_dir: Path,
    revision: str | None,
    allow_patterns: list[str] | str | None,
    base: str,
    progress: bool,
) -> None:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import build_hf_headers, filter_repo_objects

    api = HfApi(endpoint=base)  # explicit: HF_ENDPOINT is read only when hf is imported
    try:
        commit = api.repo_info(hub_id, revision=revision).sha
        tree = [
            f
            for f in api.list_repo_tree(hub_id, recursive=True, revision=commit)
            if isinstance(f, RepoFile)
        ]
    except _hf_errors() as exc:
        raise _hub_error(exc, hub_id, base) from exc
    chosen = set(filter_repo_objects([f.path for f in tree], allow_patterns=allow_patterns))
    big = [f for f in tree if f.path in chosen and f.lfs and f.lfs.size >= RESUME_MIN_SIZE]
    headers = build_hf_headers()
    cache = local_hash_cache(local_dir)
    for f in big:
        url = f"{base}/{hub_id}/resolve/{commit}/{url_path(f.path)}"
        fetch_resumable(
            url, local_dir, f.path, f.lfs.size, f.lfs.sha256, commit, headers, progress, cache
        )
    try:
        snapshot_download(
            hub_id,
            revision=commit,
            local_dir=local_dir,
            allow_patterns=allow_patterns,
            endpoint=base,
        )
    except _hf_errors() as exc:
        raise _hub_error(exc, hub_id, base) from exc


def _hf_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises for a hub that refuses or cannot be reached (not our bugs)."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError]
    for module in ("httpx", "httpx2"):  # huggingface_hub 1.x uses httpx, 2.x its fork httpx2
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).HTTPError)
    return tuple(errors)


def _download_modelscope(
    hub_id: str,
    local_dir: Path,
    revision: str | None,
    allow_patterns: list[str] | str | None,
    base: str,
    progress: bool,
) -> None:
    # ModelScope resumes partial files itself (Range requests) and shows tqdm.auto bars.
    from modelscope import snapshot_download

    try:
        snapshot_download(
            model_id=hub_id,
            revision=revision,
            local_dir=str(local_dir),
            allow_patterns=allow_patterns,
            endpoint=base,
        )
    except Exception as exc:
        # modelscope raises many unrelated types (requests errors, its own NotExistError,
        # ValueError, ...); the message keeps the type and text, so a bug still shows.
        raise _hub_error(exc, hub_id, base) from exc


GIT_LFS_MISSING = (
    "没有安装 git-lfs：`git clone` 只会留下约 130 字节的指针文件，不是真正的权重。先安装它："
    "Debian/Ubuntu `sudo apt-get install git-lfs`，macOS `brew install git-lfs`，conda "
    "`conda install -c conda-forge git-lfs`，Windows 装 Git for Windows（https://git-scm.com）时自带；"
    "然后运行一次 `git lfs install`。或者用 source='hf'（不需要 git）。 / "
    "git-lfs is not installed, so `git clone` would leave ~130-byte pointer files instead of the "
    "weights. Install it first: Debian/Ubuntu `sudo apt-get install git-lfs`, macOS `brew install "
    "git-lfs`, conda `conda install -c conda-forge git-lfs`, Windows: it comes with Git for Windows "
    "(https://git-scm.com). Then run `git lfs install` once. Or use source='hf' (no git needed)."
)


def git_lfs_available() -> bool:
    """True if ``git lfs`` runs."""
    try:
        return (
            subprocess.run(["git", "lfs", "version"], capture_output=True, timeout=30).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def _download_git(hub_id: str, local_dir: Path, revision: str | None, base: str) -> None:
    if shutil.which("git") is None:
        raise DownloadError("没有安装 git：改用 source='hf'（不需要 git）。 / git is not installed")
    if not git_lfs_available():
        raise DownloadError(GIT_LFS_MISSING)
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")  # a private repo fails instead of hanging
    if (local_dir / ".git").is_dir():  # an earlier clone: fetch the missing LFS objects
        cmds = [["git", "-C", str(local_dir), "lfs", "pull"]]
    elif any(local_dir.iterdir()):
        raise DownloadError(f"{local_dir} 不是空文件夹，也不是 git 克隆的仓库：换一个 local_dir。 / "
                            f"{local_dir} is not empty and not a git clone")
    else:
        branch = ["--branch", revision] if revision else []
        cmds = [
            ["git", "lfs", "install", "--skip-repo"],
            ["git", "clone", *branch, git_url(hub_id, base), str(local_dir)],
        ]
    for cmd in cmds:
        result = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise DownloadError(f"{' '.join(cmd)} failed: {result.stderr.strip()[-800:]}")
