"""``verify``: is a model folder complete and intact? Cheap checks first, hashes against the hub after."""

from __future__ import annotations

import json
import re
import shlex
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from helpers.hub.commands import download_command
from helpers.hub.files import (
    TOKENIZER_FILES,
    WEIGHT_SUFFIXES,
    VerificationError,
    is_lfs_pointer,
    local_files,
    local_hash_cache,
)
from helpers.hub.sources import Source, endpoint_for


@dataclass(frozen=True)
class RemoteFile:
    """What a hub says about one file."""

    path: str
    size: int
    sha256: str | None  # LFS files (HF tree ``lfs.oid``, ModelScope ``Sha256``)
    git_sha1: str | None  # small files on HF (tree ``oid``)


def _fix_hint(local_dir: Path, repo_id: str | None, source: str, endpoint: str | None) -> str:
    if (local_dir / ".git").exists():
        return f"cd {shlex.quote(str(local_dir))} && git lfs install && git lfs pull"
    if source == "git":
        source = "hf"
    return download_command(repo_id or "REPO_ID", source, local_dir, endpoint=endpoint)  # type: ignore[arg-type]


def _check_safetensors(path: Path) -> str | None:
    """Why a .safetensors file is broken (cheap: reads only the header), or None."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"is only {size} bytes, too short for safetensors"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 * 2**20):
            return "does not start with a safetensors header (truncated or not safetensors)"
        try:
            header = json.loads(fh.read(header_len))
        except ValueError:
            return "has an unreadable safetensors header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        return f"is {size} bytes but its header describes {expected} (truncated download?)"
    return None


def _check_pickle(path: Path) -> str | None:
    with path.open("rb") as fh:
        head = fh.read(4)
    # torch.save writes a zip ("PK"); older files are a raw pickle (protocol byte 0x80).
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return None
    return "is neither a zip nor a pickle; loading would fail with 'invalid load key'"


def remote_manifest(
    repo_id: str, source: str = "hf", endpoint: str | None = None, revision: str | None = None
) -> dict[str, RemoteFile]:
    """Sizes and hashes of a repo's files as the hub lists them."""
    base = endpoint_for(source, endpoint)
    hub_id = repo_id
    if source == "modelscope":
        # modelscope_hub directly (declared in pyproject): only its listing carries sha256.
        from modelscope_hub.api import HubApi as MsApi

        files = MsApi(endpoint=base).list_repo_files(hub_id, "model", revision=revision)
        return {
            f.path: RemoteFile(f.path, f.size, f.sha256, None) for f in files if f.type == "blob"
        }
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    tree = HfApi(endpoint=base).list_repo_tree(hub_id, recursive=True, revision=revision)
    return {
        f.path: RemoteFile(
            f.path, f.size, f.lfs.sha256 if f.lfs else None, None if f.lfs else f.blob_id
        )
        for f in tree
        if isinstance(f, RepoFile)
    }


def _recorded_manifest(local_dir: Path) -> dict[str, RemoteFile]:
    """What ``hf download --local-dir`` recorded: each file's etag (sha256 for LFS files)."""
    meta_root = local_dir / ".cache" / "huggingface" / "download"
    manifest = {}
    for meta in meta_root.rglob("*.metadata") if meta_root.is_dir() else []:
        lines = meta.read_text().splitlines()
        if len(lines) < 2:
            continue
        rel = meta.relative_to(meta_root).as_posix()[: -len(".metadata")]
        etag = lines[1].strip()
        is_sha256 = re.fullmatch(r"[0-9a-f]{64}", etag) is not None
        manifest[rel] = RemoteFile(
            rel, -1, etag if is_sha256 else None, None if is_sha256 else etag
        )
    return manifest


def verify(
    local_dir: str | Path,
    repo_id: str | None = None,
    quick: bool = False,
    endpoint: str | None = None,
    *,
    source: Source = "hf",
    revision: str | None = None,
    allow_patterns: list[str] | str | None = None,
) -> Path:
    """Check a model folder; raise VerificationError naming the file, the problem and the fix.

    quick: config, weights and tokenizer present, no git-lfs pointers, safetensors headers
    consistent with file sizes. Full (``quick=False``): also every file's size and sha256 against
    the hub's listing (when ``repo_id`` is given) or against what ``hf download`` recorded.
    ``allow_patterns``: only these files were asked for, so don't require a whole model.
    """
    local_dir = Path(local_dir).expanduser()
    fix = lambda: _fix_hint(local_dir, repo_id, source, endpoint)  # noqa: E731
    if not local_dir.is_dir():
        raise VerificationError(f"{local_dir} 不是文件夹。下载：{fix()} / {local_dir} is not a folder")
    files = local_files(local_dir)
    _check_files(files, fix)
    names = {p.relative_to(local_dir).as_posix() for p in files}
    has_gguf = any(n.endswith(".gguf") for n in names)
    if allow_patterns is None and "config.json" not in names and not has_gguf:
        raise VerificationError(f"{local_dir} 里没有 config.json。下载：{fix()} / "
                                f"{local_dir} has no config.json")
    if allow_patterns is None:
        _check_complete(local_dir, names, fix)
    if quick:
        return local_dir
    if repo_id is not None:
        manifest = remote_manifest(repo_id, source, endpoint, revision)
        if allow_patterns is not None:
            from huggingface_hub.utils import filter_repo_objects

            keep = set(filter_repo_objects(manifest, allow_patterns=allow_patterns))
            manifest = {k: v for k, v in manifest.items() if k in keep}
    else:
        manifest = _recorded_manifest(local_dir)
    _check_against(local_dir, manifest, fix)
    return local_dir


def _check_files(files: list[Path], fix: Callable[[], str]) -> None:
    """The cheap checks: no git-lfs pointers, weight files that are not truncated."""
    for path in files:
        if is_lfs_pointer(path):
            raise VerificationError(
                f"{path} 是 git-lfs 指针文件（约 130 字节的文本），不是真正的文件：克隆仓库时没有 "
                f"git-lfs。修复：{fix()} / {path} is a git-lfs pointer file, not the real file"
            )
    for path in files:
        if path.suffix == ".safetensors":
            problem = _check_safetensors(path)
        elif path.suffix in (".bin", ".pt", ".pth"):
            problem = _check_pickle(path)
        else:
            continue
        if problem:
            raise VerificationError(f"{path} 已损坏或不完整。删掉它重新下载：{fix()} / "
                                    f"{path} {problem}")


def _check_against(local_dir: Path, manifest: dict[str, RemoteFile],
                   fix: Callable[[], str]) -> None:
    """Every listed file present, of the listed size and hash (hashes cached by size and mtime)."""
    cache = local_hash_cache(local_dir)
    is_git_checkout = (local_dir / ".git").exists()
    for rel, remote in sorted(manifest.items()):
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        path = local_dir / rel
        if not path.is_file():
            raise VerificationError(f"{path} 缺失（模型托管平台上有这个文件）。修复：{fix()} / "
                                    f"{path} is missing (the hub lists it)")
        size = path.stat().st_size
        if remote.size >= 0 and size != remote.size:
            raise VerificationError(
                f"{path} 有 {size} 字节，模型托管平台上是 {remote.size} 字节（不完整或已损坏）。"
                f"删掉它重新下载：{fix()} / {path} is {size} bytes, the hub says {remote.size}"
            )
        # Small text files of a git clone may have CRLF line ends on Windows: check LFS files only.
        if remote.sha256 is None and (remote.git_sha1 is None or is_git_checkout):
            continue
        sha256, sha1 = cache.digests(path)
        if remote.sha256 is not None and sha256 != remote.sha256:
            raise VerificationError(
                f"{path} 的 sha256 和模型托管平台上的不同（文件已损坏）。删掉它重新下载：{fix()} / "
                f"{path}: sha256 {sha256[:16]}... differs from the hub's {remote.sha256[:16]}..."
            )
        if remote.sha256 is None and sha1 != remote.git_sha1:
            raise VerificationError(
                f"{path} 的 git sha1 和模型托管平台上的不同（文件已损坏）。删掉它重新下载：{fix()} / "
                f"{path}: git sha1 {sha1[:12]}... differs from the hub's {remote.git_sha1}"
            )


def _check_complete(local_dir: Path, names: set[str], fix: Callable[[], str]) -> None:
    if any(n.endswith(".gguf") for n in names):
        return
    for index_name in [n for n in names if n.endswith(".index.json")]:
        weight_map = json.loads((local_dir / index_name).read_text()).get("weight_map", {})
        for shard in sorted(set(weight_map.values())):
            if shard not in names:
                raise VerificationError(
                    f"{local_dir / shard} 缺失（{index_name} 列出了它）。修复：{fix()} / "
                    f"{local_dir / shard} is missing ({index_name} lists it)"
                )
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        raise VerificationError(
            f"{local_dir} 里没有权重文件（*.safetensors 或 *.bin）。修复：{fix()} / "
            f"{local_dir} has no weight file (*.safetensors or *.bin)"
        )
    if not names & set(TOKENIZER_FILES):
        raise VerificationError(
            f"{local_dir} 里没有分词器文件（{', '.join(TOKENIZER_FILES)}）。修复：{fix()} / "
            f"{local_dir} has no tokenizer file ({', '.join(TOKENIZER_FILES)})"
        )
