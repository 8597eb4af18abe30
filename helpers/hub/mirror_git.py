"""The local mirror speaks git: ``git clone http://HOST:PORT/org/name``, weights through Git LFS.

Each mirrored folder gets a real bare repository, ``ROOT/.dhllm/git/org/name.git``, built by git
itself: small files as blobs, weights as Git LFS pointer files (the spec's three lines, so the
mirror machine needs git but not git-lfs) and a ``.gitattributes`` that tracks them with LFS, as
the hub's repositories do. The weights are never copied: the Git LFS batch API answers with links
to the mirror's own ``resolve`` endpoint, which serves the folder's files (Range, counters and all).

The repository is served by ``git http-backend``, git's own CGI program, through a few lines of
glue below, not by the dumb protocol (static files after ``git update-server-info``): the smart
protocol sends one pack holding just what the client lacks, and it supports protocol v2 and
``git clone --depth 1`` (the dumb one refuses shallow clones). It is what the real hubs speak.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from helpers.hub.files import LFS_SUFFIXES
from helpers.hub.mirror_store import Entry, MirrorError, MirrorRoot

GIT_DIR = ".dhllm/git"  # under the mirror root; hidden, so never listed as a model
SOURCE_KEY = "dhllm-source"  # in each bare repo: the folder state it was built from
LFS_JSON = "application/vnd.git-lfs+json"
NO_GIT = (
    "git is not installed on the mirror's machine, so it cannot serve `git clone`. Install git "
    "there (https://git-scm.com); hf download and ModelScope work without it."
)
_build_lock = threading.Lock()


def gitattributes(entries: list[Entry]) -> str:
    """HF-style ``.gitattributes``: weight suffixes, plus any other large file by its path."""
    lines = [f"*{suffix} filter=lfs diff=lfs merge=lfs -text" for suffix in LFS_SUFFIXES]
    for e in entries:
        if e.lfs and not e.path.endswith(LFS_SUFFIXES):
            # As `git lfs track` writes it: gitattributes patterns end at a space.
            lines.append(f"{e.path.replace(' ', '[[:space:]]')} filter=lfs diff=lfs merge=lfs -text")
    return "\n".join(lines) + "\n"


def _git(git_dir: Path, *args: str, stdin: str | None = None, env: dict | None = None) -> str:
    """Run one git command on ``git_dir``; return its stdout."""
    result = subprocess.run(
        ["git", f"--git-dir={git_dir}", *args], input=stdin, capture_output=True, text=True,
        env={**_clean_env(), **(env or {})}, check=False,
    )
    if result.returncode != 0:
        raise MirrorError(503, "GitError", f"git {args[0]} failed: {result.stderr.strip()[-500:]}")
    return result.stdout


def _clean_env() -> dict[str, str]:
    """This process's environment without GIT_* variables (a GIT_DIR set by a caller misleads git)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}


def _build(mirror: MirrorRoot, repo_dir: Path, git_dir: Path) -> None:
    """Write a bare repo at ``git_dir`` with one commit of the folder (weights as LFS pointers)."""
    entries = [e for e in mirror.entries(repo_dir) if "\n" not in e.path]
    newest = max([int((repo_dir / e.path).stat().st_mtime) for e in entries], default=0)
    _git(git_dir, "init", "--bare", "-q", str(git_dir))
    _git(git_dir, "symbolic-ref", "HEAD", "refs/heads/main")
    _git(git_dir, "config", "http.receivepack", "false")  # read-only, whoever asks
    scratch = git_dir / "dhllm-scratch"
    scratch.mkdir()
    sources = [(".gitattributes", scratch / "gitattributes")]
    sources[0][1].write_text(gitattributes(entries))
    for i, e in enumerate(entries):
        if e.lfs:  # the pointer, not the weights: git-lfs fetches those through the batch API
            pointer = scratch / f"pointer-{i}"
            pointer.write_bytes(e.pointer())
            sources.append((e.path, pointer))
        else:
            sources.append((e.path, repo_dir / e.path))
    blobs = _git(git_dir, "hash-object", "-w", "--no-filters", "--stdin-paths",
                 stdin="".join(f"{src}\n" for _, src in sources)).split()
    index = {"GIT_INDEX_FILE": str(scratch / "index")}
    _git(git_dir, "update-index", "-z", "--add", "--index-info", env=index,
         stdin="".join(f"100644 {sha}\t{path}\0" for (path, _), sha in zip(sources, blobs,
                                                                           strict=True)))
    tree = _git(git_dir, "write-tree", env=index).strip()
    # Fixed names and dates: the same folder always gives the same commit id.
    who = {f"GIT_{role}_{part}": value for role in ("AUTHOR", "COMMITTER")
           for part, value in (("NAME", "dhllm mirror"), ("EMAIL", "mirror@dhllm.invalid"),
                               ("DATE", f"{newest} +0000"))}
    message = f"{repo_dir.parent.name}/{repo_dir.name}, served by dhllm's local mirror\n"
    commit = _git(git_dir, "commit-tree", tree, stdin=message, env=who).strip()
    _git(git_dir, "update-ref", "refs/heads/main", commit)
    shutil.rmtree(scratch)


def bare_repo(mirror: MirrorRoot, org: str, name: str) -> Path:
    """The bare repo of ``org/name``, (re)built when the folder changed; MirrorError if unknown."""
    repo_dir = mirror.repo_dir(org, name)
    git_dir = mirror.root / GIT_DIR / org / f"{name}.git"
    key = mirror.commit(repo_dir)
    with _build_lock:  # two first clones at once build it once
        stamp = git_dir / SOURCE_KEY
        if stamp.is_file() and stamp.read_text() == key:
            return git_dir
        if shutil.which("git") is None:
            raise MirrorError(503, "GitMissing", NO_GIT)
        building = git_dir.with_name(f"{name}.git.building")
        shutil.rmtree(building, ignore_errors=True)
        building.parent.mkdir(parents=True, exist_ok=True)
        _build(mirror, repo_dir, building)
        (building / SOURCE_KEY).write_text(key)
        shutil.rmtree(git_dir, ignore_errors=True)
        building.rename(git_dir)
    return git_dir


# ---------------------------------------------------------------------------- git http-backend


def _cgi_env(request: Request, git_root: Path, path_info: str, body_size: int) -> dict[str, str]:
    """The CGI variables ``git http-backend`` reads (RFC 3875, plus git's own)."""
    env = _clean_env() | {
        "GIT_PROJECT_ROOT": str(git_root),
        "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": path_info,
        "REQUEST_METHOD": request.method,
        "QUERY_STRING": request.url.query,
        "CONTENT_TYPE": request.headers.get("content-type", ""),
        "CONTENT_LENGTH": str(body_size),
        "REMOTE_ADDR": request.client.host if request.client else "",
    }
    for header in ("git-protocol", "content-encoding", "accept-encoding"):
        if header in request.headers:  # protocol v2, gzipped requests
            env["HTTP_" + header.upper().replace("-", "_")] = request.headers[header]
    return env


def _run_backend(env: dict[str, str], body: bytes) -> tuple[int, dict[str, str], Iterator[bytes]]:
    """Start ``git http-backend``; return status, headers and the rest of its output as a stream."""
    with tempfile.TemporaryFile() as stdin:  # a file, not a pipe: no deadlock on big bodies
        stdin.write(body)
        stdin.seek(0)
        proc = subprocess.Popen(["git", "http-backend"], stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    head = b""
    while b"\r\n\r\n" not in head and (chunk := proc.stdout.read1(65536)):
        head += chunk
    raw_headers, _, rest = head.partition(b"\r\n\r\n")
    status, headers = 200, {}
    for line in raw_headers.decode("latin-1").split("\r\n"):
        key, _, value = line.partition(":")
        if key.lower() == "status":
            status = int(value.split()[0])
        elif key:
            headers[key] = value.strip()

    def stream() -> Iterator[bytes]:
        try:
            if rest:
                yield rest
            while chunk := proc.stdout.read1(65536):
                yield chunk
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    return status, headers, stream()


async def _smart_http(request: Request, mirror: MirrorRoot, org: str, name: str,
                      action: str) -> Response:
    """One request of git's smart HTTP protocol, handed to ``git http-backend``."""
    service = request.query_params.get("service") if action == "info/refs" else action
    if service != "git-upload-pack":
        return PlainTextResponse(
            "This mirror is read-only: it serves git clone, fetch and pull (smart HTTP), not push.",
            status_code=403)
    name = name.removesuffix(".git")
    body = await request.body()
    try:
        git_dir = await run_in_threadpool(bare_repo, mirror, org, name)
    except MirrorError as exc:
        # Plain text: git prints it as "remote: ..." above its own "repository not found".
        text = exc.message
        if exc.code == "RepoNotFound":
            served = mirror.repos()
            text += ". This mirror serves: " + (", ".join(served[:20]) or "(nothing yet)")
        return PlainTextResponse(text + "\n", status_code=exc.status)
    path_info = f"/{org}/{git_dir.name}/{action}"
    env = _cgi_env(request, git_dir.parent.parent, path_info, len(body))
    status, headers, stream = await run_in_threadpool(_run_backend, env, body)
    media_type = headers.pop("Content-Type", None)
    return StreamingResponse(stream, status_code=status, headers=headers, media_type=media_type)


# ---------------------------------------------------------------------------- Git LFS batch API


class LfsObject(BaseModel):
    oid: str
    size: int


class LfsBatch(BaseModel):
    operation: str
    objects: list[LfsObject]
    transfers: list[str] = ["basic"]


def _lfs_batch(request: Request, mirror: MirrorRoot, org: str, name: str,
               batch: LfsBatch) -> JSONResponse:
    """Links to the mirror's own file endpoint for each object asked for (basic transfer)."""
    name = name.removesuffix(".git")
    try:
        repo_dir = mirror.repo_dir(org, name)
    except MirrorError as exc:
        return JSONResponse({"message": exc.message}, exc.status, media_type=LFS_JSON)
    if batch.operation != "download":
        return JSONResponse({"message": "This mirror is read-only: Git LFS uploads are refused."},
                            403, media_type=LFS_JSON)
    by_oid = {e.sha256: e for e in mirror.entries(repo_dir) if e.lfs}
    base = f"{str(request.base_url).rstrip('/')}/{org}/{name}/resolve/main/"
    objects: list[dict[str, Any]] = []
    for obj in batch.objects:
        entry = by_oid.get(obj.oid)
        if entry is None or entry.size != obj.size:
            error = {"code": 404, "message": f"object {obj.oid} ({obj.size} bytes) is not in "
                                             f"{org}/{name}"}
            objects.append({"oid": obj.oid, "size": obj.size, "error": error})
            continue
        href = base + quote(entry.path)
        objects.append({"oid": obj.oid, "size": obj.size, "authenticated": True,
                        "actions": {"download": {"href": href, "expires_in": 86400}}})
    return JSONResponse({"transfer": "basic", "objects": objects}, media_type=LFS_JSON)


def add_git_routes(app: FastAPI, mirror: MirrorRoot) -> None:
    """``git clone``/``fetch`` (smart HTTP, read-only) and the Git LFS batch API."""

    @app.get("/{org}/{name}/info/refs")
    async def git_refs(org: str, name: str, request: Request) -> Response:
        return await _smart_http(request, mirror, org, name, "info/refs")

    @app.post("/{org}/{name}/git-upload-pack")
    async def git_upload_pack(org: str, name: str, request: Request) -> Response:
        return await _smart_http(request, mirror, org, name, "git-upload-pack")

    @app.post("/{org}/{name}/git-receive-pack")
    async def git_receive_pack(org: str, name: str, request: Request) -> Response:
        return await _smart_http(request, mirror, org, name, "git-receive-pack")

    # git-lfs appends ".git" to the clone URL: http://HOST/org/name.git/info/lfs/objects/batch
    @app.post("/{org}/{name}/info/lfs/objects/batch")
    def lfs_batch(org: str, name: str, batch: LfsBatch, request: Request) -> JSONResponse:
        return _lfs_batch(request, mirror, org, name, batch)
