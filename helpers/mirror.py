"""A local model hub: serves ``ROOT/{org}/{name}/...`` with the Hugging Face and ModelScope APIs.

With ``HF_ENDPOINT=http://127.0.0.1:8090`` the unchanged ``hf download``, ``snapshot_download``,
``hf_hub_download`` and ``from_pretrained("org/name")`` download from it, and so does
``modelscope.snapshot_download`` with ``MODELSCOPE_ENDPOINT=http://127.0.0.1:8090``: a classroom
or an offline CI shares one copy of the weights. Written by hand because nothing on PyPI serves
both APIs from a plain folder (olah, the nearest, fails on a tokenizer's probe; see FACTS.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from helpers.download import (
    LFS_MIN_SIZE,
    LFS_SUFFIXES,
    HashCache,
    Source,
    download,
    git_blob_sha1,
    local_files,
    resolve_repo_id,
    verify,
)
from helpers.server.background import ServerHandle, start_uvicorn

REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
BRANCHES = ("main", "master")
HASH_STORE = ".dhllm/hashes.json"


class MirrorError(Exception):
    """A client error: HTTP status, hub error code (``X-Error-Code``) and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class MirrorStats:
    """Bytes and requests served (tests and benchmarks read it), and an optional throttle."""

    throttle: float | None = None  # bytes per second per connection; None = full speed
    bytes_served: int = 0
    requests: int = 0
    per_path: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, path: str, nbytes: int) -> None:
        with self._lock:
            self.bytes_served += nbytes
            self.per_path[path] += nbytes

    def reset(self) -> None:
        """Zero the counters."""
        with self._lock:
            self.bytes_served, self.requests = 0, 0
            self.per_path.clear()


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

    def _inside(self, path: Path) -> bool:
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
        if not path.is_dir() or not self._inside(path):
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
        if any(p.startswith(".") for p in parts) or not path.is_file() or not self._inside(path):
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
        return [self.entry(repo_dir, p) for p in local_files(repo_dir) if self._inside(p)]

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
            if self._inside(path):
                self.hashes.digests(path.resolve() if path.is_symlink() else path)
        return len(files)


class _Meter:
    """ASGI middleware: counts response body bytes and, if asked, throttles them.

    Hand-written because the throttle must pace the body as it is sent (to test resume against a
    slow hub); no Starlette middleware does that.
    """

    def __init__(self, app: Any, stats: MirrorStats) -> None:
        self.app, self.stats = app, stats

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.stats._lock:
            self.stats.requests += 1
        start, sent = time.monotonic(), 0
        path = scope.get("path", "")

        async def metered_send(message: dict) -> None:
            nonlocal sent
            if message["type"] == "http.response.body" and message.get("body"):
                nbytes = len(message["body"])
                throttle = self.stats.throttle
                if throttle:
                    sent += nbytes
                    delay = start + sent / throttle - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await send(message)
                self.stats.add(path, nbytes)
                return
            await send(message)

        await self.app(scope, receive, metered_send)


class _HubFileResponse(FileResponse):
    # Starlette's 64 KiB chunks cap loopback throughput; 1 MiB chunks give several times more.
    chunk_size = 2**20


def _http_date(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def create_mirror_app(root: str | Path, throttle: float | None = None) -> FastAPI:
    """The mirror as a FastAPI app; ``app.state.stats`` holds counters and the throttle."""
    mirror = MirrorRoot(root)
    stats = MirrorStats(throttle=throttle)
    app = FastAPI(title="dhllm model mirror", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mirror = mirror
    app.state.stats = stats
    app.add_middleware(_Meter, stats=stats)

    @app.exception_handler(MirrorError)
    async def _mirror_error(request: Request, exc: MirrorError) -> JSONResponse:
        headers = {"X-Error-Code": exc.code, "X-Error-Message": exc.message}
        if request.url.path.startswith("/api/v1/"):  # ModelScope's error shape
            body: dict[str, Any] = {"Code": exc.status, "Message": exc.message, "Success": False}
        else:
            body = {"error": exc.message}
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "repos": len(mirror.repos())}

    # ------------------------------------------------------------ Hugging Face hub API

    @app.get("/api/models")
    def list_models() -> list[dict[str, str]]:
        return [{"id": repo, "modelId": repo} for repo in mirror.repos()]

    def model_info(org: str, name: str, revision: str | None, blobs: bool) -> dict[str, Any]:
        repo_dir = mirror.repo_dir(org, name)
        commit = mirror.check_revision(repo_dir, revision)
        entries = mirror.entries(repo_dir)
        siblings = []
        for e in entries:
            sibling: dict[str, Any] = {"rfilename": e.path}
            if blobs:
                item = e.tree_item()
                sibling |= {"size": e.size, "blobId": item["oid"]}
                if e.lfs:
                    sibling["lfs"] = {
                        "sha256": e.sha256,
                        "size": e.size,
                        "pointerSize": item["lfs"]["pointerSize"],
                    }
            siblings.append(sibling)
        modified = _http_date(
            max((repo_dir / e.path).stat().st_mtime for e in entries)
            if entries
            else repo_dir.stat().st_mtime
        )
        return {
            "_id": commit[:24],
            "id": f"{org}/{name}",
            "modelId": f"{org}/{name}",
            "author": org,
            "sha": commit,
            "lastModified": modified,
            "createdAt": modified,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["dhllm-mirror"],
            "library_name": "transformers",
            "siblings": siblings,
            "usedStorage": sum(e.size for e in entries),
        }

    @app.get("/api/models/{org}/{name}")
    def info(org: str, name: str, blobs: bool = False) -> dict[str, Any]:
        return model_info(org, name, None, blobs)

    @app.get("/api/models/{org}/{name}/revision/{revision}")
    def info_at(org: str, name: str, revision: str, blobs: bool = False) -> dict[str, Any]:
        return model_info(org, name, revision, blobs)

    def tree(org: str, name: str, revision: str, path: str, recursive: bool) -> list[dict]:
        repo_dir = mirror.repo_dir(org, name)
        mirror.check_revision(repo_dir, revision)
        prefix = path.strip("/")
        if prefix:
            parts = prefix.split("/")
            folder = repo_dir.joinpath(*parts)
            if any(p in ("", ".", "..") or p.startswith(".") for p in parts) or not (
                folder.is_dir() and mirror._inside(folder)
            ):
                raise MirrorError(404, "EntryNotFound", f"{prefix} does not exist on {revision}")
            prefix += "/"
        items: dict[str, dict] = {}
        for e in mirror.entries(repo_dir):
            if not e.path.startswith(prefix):
                continue
            rest = e.path[len(prefix) :].split("/")
            # Directories on the way to each file, as the hub lists them.
            for depth in range(1, len(rest) if recursive else min(len(rest), 2)):
                d = prefix + "/".join(rest[:depth])
                items.setdefault(d, {"type": "directory", "oid": "0" * 40, "size": 0, "path": d})
            if recursive or len(rest) == 1:
                items[e.path] = e.tree_item()
        return sorted(items.values(), key=lambda item: item["path"])

    @app.get("/api/models/{org}/{name}/tree/{revision}")
    def tree_root(org: str, name: str, revision: str, recursive: bool = False) -> list[dict]:
        return tree(org, name, revision, "", recursive)

    @app.get("/api/models/{org}/{name}/tree/{revision}/{path:path}")
    def tree_path(
        org: str, name: str, revision: str, path: str, recursive: bool = False
    ) -> list[dict]:
        return tree(org, name, revision, path, recursive)

    def serve_file(org: str, name: str, revision: str | None, path: str) -> FileResponse:
        repo_dir = mirror.repo_dir(org, name)
        commit = mirror.check_revision(repo_dir, revision)
        file = mirror.file(repo_dir, path)
        e = mirror.entry(repo_dir, file)
        headers = {"ETag": f'"{e.etag}"', "X-Repo-Commit": commit}
        if e.lfs:
            headers |= {"X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size)}
        return _HubFileResponse(
            file,
            headers=headers,
            media_type="application/octet-stream",
            content_disposition_type="inline",
        )

    @app.api_route("/{org}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve(org: str, name: str, revision: str, path: str) -> FileResponse:
        return serve_file(org, name, revision, path)

    # ------------------------------------------------------------ ModelScope API

    @app.get("/api/v1/models/{org}/{name}")
    def ms_info(org: str, name: str) -> dict[str, Any]:
        repo_dir = mirror.repo_dir(org, name)
        return {
            "Code": 200,
            "Success": True,
            "Data": {
                "Name": name,
                "Path": org,
                "Id": f"{org}/{name}",
                "Revision": "master",
                "LatestCommitId": mirror.commit(repo_dir),
            },
        }

    @app.get("/api/v1/models/{org}/{name}/revisions")
    def ms_revisions(org: str, name: str) -> dict[str, Any]:
        mirror.repo_dir(org, name)
        return {
            "Code": 200,
            "Success": True,
            "Data": {"RevisionMap": {"Branches": [{"Revision": "master"}], "Tags": []}},
        }

    @app.get("/api/v1/models/{org}/{name}/repo/files")
    def ms_files(org: str, name: str, Revision: str | None = None) -> dict[str, Any]:
        repo_dir = mirror.repo_dir(org, name)
        commit = mirror.check_revision(repo_dir, Revision)
        files = [
            {
                "Name": e.path.split("/")[-1],
                "Path": e.path,
                "Type": "blob",
                "Size": e.size,
                "Sha256": e.sha256,
                "IsLFS": e.lfs,
                "Revision": commit,
            }
            for e in mirror.entries(repo_dir)
        ]
        return {"Code": 200, "Success": True, "Data": {"Files": files}}

    @app.api_route("/api/v1/models/{org}/{name}/repo", methods=["GET", "HEAD"])
    def ms_file(
        org: str, name: str, FilePath: str = "", Revision: str | None = None
    ) -> FileResponse:
        return serve_file(org, name, Revision, FilePath)

    return app


class MirrorHandle(ServerHandle):
    """A mirror running in a background thread: ``.url``, ``.stop()``, ``.stats``, ``.root``."""

    def __init__(self, handle: ServerHandle, app: FastAPI) -> None:
        super().__init__(handle.server, handle.thread, handle.url)
        self.app = app
        self.stats: MirrorStats = app.state.stats
        self.root: Path = app.state.mirror.root

    def env(self) -> dict[str, str]:
        """The environment variables that point hf and modelscope clients at this mirror."""
        return {"HF_ENDPOINT": self.url, "MODELSCOPE_ENDPOINT": self.url}


def mirror_in_background(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 8090,
    throttle: float | None = None,
    progress: bool = True,
) -> MirrorHandle:
    """Serve ``root`` from a daemon thread (works in Jupyter); hashes new files first."""
    app = create_mirror_app(root, throttle=throttle)
    app.state.mirror.index(progress=progress)
    return MirrorHandle(start_uvicorn(app, host=host, port=port, health_path="/health"), app)


def serve_mirror(
    root: str | Path, host: str = "127.0.0.1", port: int = 8090, throttle: float | None = None
) -> None:
    """Serve ``root`` in the foreground until Ctrl-C (the ``dhllm mirror serve`` command)."""
    import uvicorn

    from helpers.server.background import ensure_port_free

    ensure_port_free(host, port)
    app = create_mirror_app(root, throttle=throttle)
    mirror: MirrorRoot = app.state.mirror
    mirror.index()
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    repos = mirror.repos()
    print(
        f"serving {len(repos)} repos from {mirror.root} at {url}: {', '.join(repos) or '(none)'}",
        file=sys.stderr,
    )
    print(f"  export HF_ENDPOINT={url} MODELSCOPE_ENDPOINT={url}", file=sys.stderr)
    print(f'  PowerShell: $env:HF_ENDPOINT = "{url}"', file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")


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
    hub_id = resolve_repo_id(repo_id, str(source) if hub_source else "hf")
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


STAND_IN_NOTE = "STAND-IN.md"


def add_stand_in(
    root: str | Path,
    repo_id: str,
    model: Literal["tiny", "embedded"] = "tiny",
    progress: bool = True,
) -> Path:
    """Serve a small stand-in as ``repo_id`` (e.g. Linly-AI/Chinese-LLaMA-2-7B-hf) with no hub.

    ``tiny``: a 16 MB random 2-layer model (Llama for ids naming llama, else Qwen2; built in
    ~0.2 s; downloads in a blink; its answers are noise). ``embedded``: the real
    SmolLM2-135M-Instruct (538 MB, hard-linked, answers in English). The folder gets a
    STAND-IN.md saying what it really is.
    """
    root = Path(root).expanduser()
    if model == "embedded":
        from helpers.embedded import embedded_model_dir

        source, what = embedded_model_dir(verbose=progress), "SmolLM2-135M-Instruct (embedded)"
    elif model == "tiny":
        from helpers.models import build_tiny_model

        arch = "llama" if "llama" in repo_id.lower() else "qwen2"
        source = root / ".dhllm" / f"tiny-{arch}"  # hidden: the mirror never lists it
        if not (source / "config.json").is_file():
            build_tiny_model(source, arch=arch)
        what = f"a tiny random 2-layer {arch} model (its answers are noise)"
    else:
        raise ValueError(f"model must be 'tiny' or 'embedded', not {model!r}")
    target = add_to_mirror(repo_id, root, source, progress=progress)
    note = target / STAND_IN_NOTE
    if not note.exists():
        note.write_text(
            f"# Stand-in\n\nThis is {what}, served as {repo_id} by dhllm's local mirror so "
            f"that downloads can be practised offline. It is not {repo_id}.\n"
        )
        MirrorRoot(root).index(progress=False)
    return target
