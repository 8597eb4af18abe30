"""The folder behind the local mirror: ``ROOT/{org}/{name}/...``, safe paths, hashes, adding models."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.hub.download import download
from helpers.hub.files import LFS_MIN_SIZE, LFS_SUFFIXES, HashCache, git_blob_sha1, local_files
from helpers.hub.sources import Source
from helpers.hub.verify import verify

REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
BRANCHES = ("main", "master")
HASH_STORE = ".dhllm/hashes.json"


class MirrorError(Exception):
    """A client error: HTTP status, hub error code (``X-Error-Code``) and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass



@dataclass(frozen=True)
class Entry:
    """One file of a mirrored repo."""

    path: str  # relative, with "/"
    size: int
    lfs: bool
    sha256: str
    git_sha1: str

    @property
    def etag(self) -> str:
        # What the hub sends: sha256 for LFS files, the git blob sha1 for the others.
        return self.sha256 if self.lfs else self.git_sha1

    def pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {self.size}\n"
        ).encode()

    def tree_item(self) -> dict[str, Any]:
        """An entry of the HF tree API."""
        if not self.lfs:
            return {"type": "file", "oid": self.git_sha1, "size": self.size, "path": self.path}
        pointer = self.pointer()
        oid = git_blob_sha1(len(pointer))
        oid.update(pointer)
        return {
            "type": "file",
            "oid": oid.hexdigest(),
            "size": self.size,
            "path": self.path,
            "lfs": {"oid": self.sha256, "size": self.size, "pointerSize": len(pointer)},
        }


def is_lfs(path: str, size: int) -> bool:
    """Whether the hub would keep this file in git-lfs (weights, or anything over 10 MB)."""
    return size >= LFS_MIN_SIZE or path.lower().endswith(LFS_SUFFIXES)


class MirrorRoot:
    """The folder behind a mirror: safe path resolution, listings, hashes (cached)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"mirror folder {self.root} does not exist")
        self.hashes = HashCache(self.root, self.root / HASH_STORE)

    def repos(self) -> list[str]:
        """``org/name`` of every repo folder."""
        found = []
        for org in sorted(self.root.iterdir()):
            if org.is_dir() and REPO_PART.match(org.name):
                found += [
                    f"{org.name}/{n.name}"
                    for n in sorted(org.iterdir())
                    if n.is_dir() and REPO_PART.match(n.name)
                ]
        return found

    def inside(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.root)
        except (ValueError, OSError):
            return False
        return True

    def repo_dir(self, org: str, name: str) -> Path:
        """The repo's folder, or MirrorError 404 RepoNotFound."""
        repo = f"{org}/{name}"
        if not (REPO_PART.match(org) and REPO_PART.match(name)) or ".." in repo:
            raise MirrorError(404, "RepoNotFound", f"Repository {repo!r} not found")
        path = self.root / org / name
        if not path.is_dir() or not self.inside(path):
            raise MirrorError(404, "RepoNotFound", f"Repository {repo!r} not found")
        return path

    def file(self, repo_dir: Path, rel: str) -> Path:
        """A file inside the repo; traversal is refused (400), anything else missing is 404."""
        parts = rel.split("/")
        if (
            not rel
            or rel.startswith(("/", "\\"))
            or "\\" in rel
            or "\x00" in rel
            or re.match(r"^[A-Za-z]:", rel)
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise MirrorError(400, "BadRequest", f"invalid file path {rel!r}")
        path = repo_dir.joinpath(*parts)
        # Hidden entries (.git, .cache, the hash store) are never served; symlinks must stay
        # inside the mirror root.
        if any(p.startswith(".") for p in parts) or not path.is_file() or not self.inside(path):
            raise MirrorError(404, "EntryNotFound", f"{rel} does not exist in the repository")
        return path

    def entry(self, repo_dir: Path, path: Path) -> Entry:
        """Size, LFS flag and digests of one file (digests cached by size and mtime)."""
        sha256, sha1 = self.hashes.digests(path.resolve() if path.is_symlink() else path)
        rel = path.relative_to(repo_dir).as_posix()
        size = path.stat().st_size
        return Entry(rel, size, is_lfs(rel, size), sha256, sha1)

    def entries(self, repo_dir: Path) -> list[Entry]:
        """Every servable file of the repo."""
        return [self.entry(repo_dir, p) for p in local_files(repo_dir) if self.inside(p)]

    def commit(self, repo_dir: Path) -> str:
        """A stable 40-hex commit id: changes whenever a file is added, removed or rewritten."""
        digest = hashlib.sha1()
        for p in local_files(repo_dir):
            stat = p.stat()
            rel = p.relative_to(repo_dir).as_posix()
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def check_revision(self, repo_dir: Path, revision: str | None) -> str:
        """The commit id for a branch name or the commit itself; else 404 RevisionNotFound."""
        commit = self.commit(repo_dir)
        if revision in (None, "", *BRANCHES, commit):
            return commit
        raise MirrorError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def index(self, progress: bool = True) -> int:
        """Hash every file now (so the first HEAD of a 14 GB file doesn't time out); return count."""
        from tqdm.auto import tqdm

        files = [(r, p) for r in self.repos() for p in local_files(self.root / r)]
        for _, path in tqdm(files, desc="hashing mirror files", unit="file", disable=not progress):
            if self.inside(path):
                self.hashes.digests(path.resolve() if path.is_symlink() else path)
        return len(files)




def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        s, d = src.stat(), dst.stat()
        if (s.st_ino == d.st_ino and s.st_dev == d.st_dev) or (
            s.st_size == d.st_size and s.st_mtime_ns == d.st_mtime_ns
        ):
            return
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:  # a hard link costs no disk space (the embedded model is 538 MB)
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def add_to_mirror(
    repo_id: str,
    root: str | Path,
    source: Source | str | Path = "hf",
    endpoint: str | None = None,
    revision: str | None = None,
    progress: bool = True,
) -> Path:
    """Put a model under ``root/org/name``: downloaded from a hub, or linked/copied from a folder."""
    hub_source = str(source) in ("hf", "hf-mirror", "modelscope")
    hub_id = repo_id
    parts = hub_id.split("/")
    if len(parts) != 2 or not all(REPO_PART.match(p) for p in parts):
        raise ValueError(f"repo id must look like org/name, not {hub_id!r}")
    root = Path(root).expanduser()
    target = root.joinpath(*parts)
    if hub_source:
        download(
            hub_id,
            str(source),
            target,
            revision=revision,
            endpoint=endpoint,  # type: ignore[arg-type]
            progress=progress,
        )
    else:
        src = Path(source).expanduser()
        if not src.is_dir():
            raise ValueError(
                f"source must be 'hf', 'hf-mirror', 'modelscope' or a folder; {src} is not a folder"
            )
        verify(src, quick=True)  # never mirror git-lfs pointers or truncated weights
        for file in local_files(src):
            _link_or_copy(file, target / file.relative_to(src))
    MirrorRoot(root).index(progress=progress)
    return target

