"""A local model hub: serves ``ROOT/{org}/{name}/...`` with the Hugging Face and ModelScope APIs
and over git.

With ``HF_ENDPOINT=http://127.0.0.1:8090`` the unchanged ``hf download``, ``snapshot_download``,
``hf_hub_download`` and ``from_pretrained("org/name")`` download from it, and so does
``modelscope.snapshot_download`` with ``MODELSCOPE_ENDPOINT=http://127.0.0.1:8090``;
``git clone http://127.0.0.1:8090/org/name`` works too, weights through Git LFS
(``helpers.hub.mirror_git``). A classroom or an offline CI shares one copy of the weights. Written by hand because nothing on PyPI serves
both APIs from a plain folder (olah, the nearest, fails on a tokenizer's
``additional_chat_templates`` probe).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from helpers.background_server import ServerHandle, display_url, ensure_port_free, start_uvicorn
from helpers.config import get_settings
from helpers.hub.mirror_git import add_git_routes
from helpers.hub.mirror_store import MirrorError, MirrorRoot


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
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")




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

    _add_hf_routes(app, mirror)
    _add_modelscope_routes(app, mirror)
    add_git_routes(app, mirror)
    return app


# ---------------------------------------------------------------------------- Hugging Face API


def _model_info(mirror: MirrorRoot, org: str, name: str, revision: str | None,
                blobs: bool) -> dict[str, Any]:
    """What ``/api/models/{org}/{name}`` answers: the commit and the file list."""
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
                sibling["lfs"] = {"sha256": e.sha256, "size": e.size,
                                  "pointerSize": item["lfs"]["pointerSize"]}
        siblings.append(sibling)
    newest = max((repo_dir / e.path).stat().st_mtime for e in entries) if entries else (
        repo_dir.stat().st_mtime)
    modified = _http_date(newest)
    return {
        "_id": commit[:24], "id": f"{org}/{name}", "modelId": f"{org}/{name}", "author": org,
        "sha": commit, "lastModified": modified, "createdAt": modified, "private": False,
        "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": ["dhllm-mirror"],
        "library_name": "transformers", "siblings": siblings,
        "usedStorage": sum(e.size for e in entries),
    }


def _tree(mirror: MirrorRoot, org: str, name: str, revision: str, path: str,
          recursive: bool) -> list[dict]:
    """The HF tree API: files and the folders on the way to them, under ``path``."""
    repo_dir = mirror.repo_dir(org, name)
    mirror.check_revision(repo_dir, revision)
    prefix = path.strip("/")
    if prefix:
        parts = prefix.split("/")
        folder = repo_dir.joinpath(*parts)
        if any(p in ("", ".", "..") or p.startswith(".") for p in parts) or not (
            folder.is_dir() and mirror.inside(folder)
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


def _serve_file(mirror: MirrorRoot, org: str, name: str, revision: str | None,
                path: str) -> FileResponse:
    """One file with the hub's headers (ETag, commit; sizes of LFS files); Range works."""
    repo_dir = mirror.repo_dir(org, name)
    commit = mirror.check_revision(repo_dir, revision)
    file = mirror.file(repo_dir, path)
    e = mirror.entry(repo_dir, file)
    headers = {"ETag": f'"{e.etag}"', "X-Repo-Commit": commit}
    if e.lfs:
        headers |= {"X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size)}
    return _HubFileResponse(file, headers=headers, media_type="application/octet-stream",
                            content_disposition_type="inline")


def _add_hf_routes(app: FastAPI, mirror: MirrorRoot) -> None:
    """The part of the Hugging Face hub API that hf, huggingface_hub and transformers use."""

    @app.get("/api/models")
    def list_models() -> list[dict[str, str]]:
        return [{"id": repo, "modelId": repo} for repo in mirror.repos()]

    @app.get("/api/models/{org}/{name}")
    def info(org: str, name: str, blobs: bool = False) -> dict[str, Any]:
        return _model_info(mirror, org, name, None, blobs)

    @app.get("/api/models/{org}/{name}/revision/{revision}")
    def info_at(org: str, name: str, revision: str, blobs: bool = False) -> dict[str, Any]:
        return _model_info(mirror, org, name, revision, blobs)

    @app.get("/api/models/{org}/{name}/tree/{revision}")
    def tree_root(org: str, name: str, revision: str, recursive: bool = False) -> list[dict]:
        return _tree(mirror, org, name, revision, "", recursive)

    @app.get("/api/models/{org}/{name}/tree/{revision}/{path:path}")
    def tree_path(
        org: str, name: str, revision: str, path: str, recursive: bool = False
    ) -> list[dict]:
        return _tree(mirror, org, name, revision, path, recursive)

    @app.api_route("/{org}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve(org: str, name: str, revision: str, path: str) -> FileResponse:
        return _serve_file(mirror, org, name, revision, path)


# ---------------------------------------------------------------------------- ModelScope API


def _add_modelscope_routes(app: FastAPI, mirror: MirrorRoot) -> None:
    """The part of ModelScope's API that ``modelscope.snapshot_download`` uses."""

    def ok(data: dict[str, Any]) -> dict[str, Any]:
        return {"Code": 200, "Success": True, "Data": data}

    @app.get("/api/v1/models/{org}/{name}")
    def ms_info(org: str, name: str) -> dict[str, Any]:
        repo_dir = mirror.repo_dir(org, name)
        return ok({"Name": name, "Path": org, "Id": f"{org}/{name}", "Revision": "master",
                   "LatestCommitId": mirror.commit(repo_dir)})

    @app.get("/api/v1/models/{org}/{name}/revisions")
    def ms_revisions(org: str, name: str) -> dict[str, Any]:
        mirror.repo_dir(org, name)
        return ok({"RevisionMap": {"Branches": [{"Revision": "master"}], "Tags": []}})

    @app.get("/api/v1/models/{org}/{name}/repo/files")
    def ms_files(org: str, name: str, Revision: str | None = None) -> dict[str, Any]:
        repo_dir = mirror.repo_dir(org, name)
        commit = mirror.check_revision(repo_dir, Revision)
        files = [
            {"Name": e.path.split("/")[-1], "Path": e.path, "Type": "blob", "Size": e.size,
             "Sha256": e.sha256, "IsLFS": e.lfs, "Revision": commit}
            for e in mirror.entries(repo_dir)
        ]
        return ok({"Files": files})

    @app.api_route("/api/v1/models/{org}/{name}/repo", methods=["GET", "HEAD"])
    def ms_file(
        org: str, name: str, FilePath: str = "", Revision: str | None = None
    ) -> FileResponse:
        return _serve_file(mirror, org, name, Revision, FilePath)


# ---------------------------------------------------------------------------- running it


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
    port: int | None = None,
    throttle: float | None = None,
    progress: bool = True,
) -> MirrorHandle:
    """Serve ``root`` from a daemon thread (works in Jupyter); hashes new files first."""
    port = get_settings().mirror_port if port is None else port
    app = create_mirror_app(root, throttle=throttle)
    app.state.mirror.index(progress=progress)
    return MirrorHandle(start_uvicorn(app, host=host, port=port, health_path="/health"), app)


def serve_mirror(
    root: str | Path, host: str = "127.0.0.1", port: int | None = None,
    throttle: float | None = None,
) -> None:
    """Serve ``root`` in the foreground until Ctrl-C (the ``dhllm mirror serve`` command)."""
    import uvicorn

    port = get_settings().mirror_port if port is None else port
    ensure_port_free(host, port)
    app = create_mirror_app(root, throttle=throttle)
    mirror: MirrorRoot = app.state.mirror
    mirror.index()
    url = display_url(host, port)
    repos = mirror.repos()
    print(
        f"serving {len(repos)} repos from {mirror.root} at {url}: {', '.join(repos) or '(none)'}",
        file=sys.stderr,
    )
    print(f"  export HF_ENDPOINT={url} MODELSCOPE_ENDPOINT={url}", file=sys.stderr)
    print(f'  PowerShell: $env:HF_ENDPOINT = "{url}"', file=sys.stderr)
    if repos:
        print(f"  git lfs install; git clone {url}/{repos[0]}", file=sys.stderr)
    if host in ("0.0.0.0", "::"):
        print("  other machines: use this machine's LAN address instead of 127.0.0.1",
              file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
