"""Downloads from Hugging Face, hf-mirror, ModelScope or git; ``verify`` of a local folder.

Knows nothing of HTTP serving. Layout: ``download()`` writes a plain folder (``local_dir``, by
default ``<cache_dir>/downloads/<org>/<name>``), the layout of ``hf download --local-dir``: one
folder per model that ``from_pretrained``, ``verify`` and the local mirror can all use as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Source = Literal["hf", "hf-mirror", "modelscope", "git"]
Shell = Literal["bash", "powershell"]

HF_ENDPOINT = "https://huggingface.co"
HF_MIRROR_ENDPOINT = "https://hf-mirror.com"
MODELSCOPE_ENDPOINT = "https://www.modelscope.cn"
SOURCES: tuple[str, ...] = ("hf", "hf-mirror", "modelscope", "git")

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "qwen.tiktoken",
)
# Files the hubs keep in git-lfs (HF's default .gitattributes; anything over 10 MB must be LFS).
LFS_SUFFIXES = WEIGHT_SUFFIXES + (
    ".model",
    ".onnx",
    ".ot",
    ".tflite",
    ".npz",
    ".zip",
    ".tar",
    ".gz",
)
LFS_MIN_SIZE = 10 * 2**20
# LFS files at least this big are fetched by our own Range download (see _fetch_resumable):
# huggingface_hub 2.4 restarts partial files from zero in a new process.
RESUME_MIN_SIZE = 1 * 2**20
HASH_CACHE_NAME = ".cache/dhllm/hashes.json"


class VerificationError(ValueError):
    """A downloaded folder is incomplete or broken; the message says which file and the fix."""


class DownloadError(RuntimeError):
    """A download failed; the message says why and what to try."""


# ---------------------------------------------------------------------------- names and commands


def resolve_repo_id(repo_id: str, source: str = "hf") -> str:
    """The hub id for ``repo_id``: a registry name maps to the source's id, anything else stays."""
    from helpers.models import REGISTRY

    spec = REGISTRY.get(repo_id)
    if spec is None:
        return repo_id
    hub_id = spec.modelscope_id if source == "modelscope" else spec.hf_id
    if hub_id is None:
        where = "ModelScope" if source == "modelscope" else "Hugging Face"
        raise ValueError(f"model {repo_id!r} has no {where} id in the registry; try another source")
    return hub_id


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
    from helpers.config import get_settings

    return get_settings().resolved_cache_dir() / "downloads" / Path(*repo_id.split("/"))


def _org_name(hub_id: str) -> str:
    """``org/name`` of an id or a git URL (``https://host/org/name.git`` -> ``org/name``)."""
    parts = [p for p in re.split(r"[/\\]", hub_id.removesuffix(".git")) if p]
    return "/".join(parts[-2:])


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
    hub_id = resolve_repo_id(repo_id, source)
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
    return f"git lfs install\ngit clone{branch} {q(_git_url(hub_id, base))} {q(target)}"


def _git_url(repo_id: str, base: str) -> str:
    if re.match(r"^(https?|ssh|file|git)://", repo_id) or Path(repo_id).is_absolute():
        return repo_id
    return f"{base}/{repo_id}"


# ---------------------------------------------------------------------------- reachability


def hub_reachable(source_or_url: str = "hf", timeout: float = 2.0) -> bool:
    """True if the hub answers HTTP within ``timeout`` seconds (any status below 500)."""
    import requests

    url = source_or_url if "://" in source_or_url else endpoint_for(source_or_url)
    try:
        return requests.head(url, timeout=timeout, allow_redirects=False).status_code < 500
    except requests.RequestException:
        return False


def reachable_hubs(timeout: float = 2.0) -> dict[str, bool]:
    """Which of hf, hf-mirror and modelscope answer, checked in parallel (``timeout`` at most)."""
    names = ("hf", "hf-mirror", "modelscope")
    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(lambda n: hub_reachable(n, timeout), names), strict=True))


# ---------------------------------------------------------------------------- hashing


def git_blob_sha1(data_size: int) -> hashlib._Hash:
    """A sha1 primed with git's blob header: feed it the content to get git's object id."""
    sha1 = hashlib.sha1()
    sha1.update(b"blob %d\0" % data_size)
    return sha1


def file_digests(path: Path) -> tuple[str, str]:
    """``(sha256, git blob sha1)`` of a file, in one pass."""
    size = path.stat().st_size
    sha256, sha1 = hashlib.sha256(), git_blob_sha1(size)
    with path.open("rb") as fh:
        while chunk := fh.read(4 * 2**20):
            sha256.update(chunk)
            sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest()


class HashCache:
    """Digests of files under ``base``, remembered by (size, mtime) and saved to a JSON file.

    Hashing a 14 GB model takes ~30 s; this keeps a mirror's HEAD answers and repeated
    ``verify`` calls from paying that again while the file is unchanged.
    """

    def __init__(self, base: Path, store: Path | None = None) -> None:
        self.base = Path(base)
        self.store = store
        self._lock = threading.Lock()
        self._entries: dict[str, list] = {}
        if store is not None and store.is_file():
            try:
                self._entries = json.loads(store.read_text())
            except (OSError, ValueError):
                self._entries = {}

    def digests(self, path: Path) -> tuple[str, str]:
        """``(sha256, git sha1)`` of ``path``, hashed only if it changed since last time."""
        stat = path.stat()
        key = path.relative_to(self.base).as_posix()
        with self._lock:
            entry = self._entries.get(key)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2], entry[3]
        sha256, sha1 = file_digests(path)
        self.record(path, sha256, sha1, stat)
        return sha256, sha1

    def record(
        self, path: Path, sha256: str, sha1: str, stat: os.stat_result | None = None
    ) -> None:
        """Remember digests computed elsewhere (e.g. while downloading)."""
        stat = stat or path.stat()
        key = path.relative_to(self.base).as_posix()
        with self._lock:
            self._entries[key] = [stat.st_size, stat.st_mtime_ns, sha256, sha1]
            if self.store is not None:
                try:  # a read-only folder still works, it just hashes again next time
                    self.store.parent.mkdir(parents=True, exist_ok=True)
                    tmp = self.store.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(self._entries))
                    os.replace(tmp, self.store)
                except OSError:
                    pass


def _local_hash_cache(local_dir: Path) -> HashCache:
    return HashCache(local_dir, local_dir / HASH_CACHE_NAME)


# ---------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class RemoteFile:
    """What a hub says about one file."""

    path: str
    size: int
    sha256: str | None  # LFS files (HF tree ``lfs.oid``, ModelScope ``Sha256``)
    git_sha1: str | None  # small files on HF (tree ``oid``)


def is_lfs_pointer(path: Path) -> bool:
    """True if ``path`` is a git-lfs pointer text file instead of the real content."""
    if path.stat().st_size > 1024:
        return False
    with path.open("rb") as fh:
        return fh.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX


def local_files(local_dir: Path) -> list[Path]:
    """Files of a model folder, without hidden ones (``.git``, ``.cache``, ``.gitattributes``)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(local_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return found


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
    hub_id = resolve_repo_id(repo_id, source)
    if source == "modelscope":
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
        raise VerificationError(f"{local_dir} is not a folder. Download it with: {fix()}")
    files = local_files(local_dir)
    names = {p.relative_to(local_dir).as_posix() for p in files}
    for path in files:
        if is_lfs_pointer(path):
            raise VerificationError(
                f"{path} is a git-lfs pointer file (~130 bytes of text), not the real file: the "
                f"repository was cloned without git-lfs. Fix: {fix()}"
            )
    for path in files:
        if path.suffix == ".safetensors":
            problem = _check_safetensors(path)
        elif path.suffix in (".bin", ".pt", ".pth"):
            problem = _check_pickle(path)
        else:
            continue
        if problem:
            raise VerificationError(f"{path} {problem}. Delete it and download again: {fix()}")
    has_gguf = any(n.endswith(".gguf") for n in names)
    if allow_patterns is None and "config.json" not in names and not has_gguf:
        raise VerificationError(f"{local_dir} has no config.json. Download it with: {fix()}")
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
    cache = _local_hash_cache(local_dir)
    is_git_checkout = (local_dir / ".git").exists()
    for rel, remote in sorted(manifest.items()):
        if rel.split("/")[-1].startswith(".") or any(p.startswith(".") for p in rel.split("/")):
            continue
        path = local_dir / rel
        if not path.is_file():
            raise VerificationError(f"{path} is missing (the hub lists it). Fix: {fix()}")
        size = path.stat().st_size
        if remote.size >= 0 and size != remote.size:
            raise VerificationError(
                f"{path} is {size} bytes, the hub says {remote.size} (incomplete or corrupted). "
                f"Delete it and download again: {fix()}"
            )
        # Small text files of a git clone may have CRLF line ends on Windows: check LFS files only.
        if remote.sha256 is None and (remote.git_sha1 is None or is_git_checkout):
            continue
        sha256, sha1 = cache.digests(path)
        if remote.sha256 is not None and sha256 != remote.sha256:
            raise VerificationError(
                f"{path}: sha256 {sha256[:16]}... differs from the hub's {remote.sha256[:16]}... "
                f"(corrupted). Delete it and download again: {fix()}"
            )
        if remote.sha256 is None and sha1 != remote.git_sha1:
            raise VerificationError(
                f"{path}: git sha1 {sha1[:12]}... differs from the hub's {remote.git_sha1}. "
                f"Delete it and download again: {fix()}"
            )
    return local_dir


def _check_complete(local_dir: Path, names: set[str], fix) -> None:
    if any(n.endswith(".gguf") for n in names):
        return
    for index_name in [n for n in names if n.endswith(".index.json")]:
        weight_map = json.loads((local_dir / index_name).read_text()).get("weight_map", {})
        for shard in sorted(set(weight_map.values())):
            if shard not in names:
                raise VerificationError(
                    f"{local_dir / shard} is missing ({index_name} lists it). Fix: {fix()}"
                )
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        raise VerificationError(
            f"{local_dir} has no weight file (*.safetensors or *.bin). Fix: {fix()}"
        )
    if not names & set(TOKENIZER_FILES):
        raise VerificationError(
            f"{local_dir} has no tokenizer file ({', '.join(TOKENIZER_FILES)}). Fix: {fix()}"
        )


# ---------------------------------------------------------------------------- downloads


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
    hub_id = resolve_repo_id(repo_id, source)
    if local_dir is None:
        local_dir = default_local_dir(_org_name(hub_id))
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
            f"{hub_id} was not found on {base} ({text}). Check the id; ModelScope ids differ from "
            f"Hugging Face ids (e.g. qwen/Qwen-1_8B-Chat vs Qwen/Qwen-1_8B-Chat)."
        )
    return DownloadError(
        f"cannot download {hub_id} from {base}: {name}: {text}. If the hub is unreachable, try "
        f"source='hf-mirror' or 'modelscope', or a local mirror (dhllm mirror serve)."
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
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import build_hf_headers, filter_repo_objects

    api = HfApi(
        endpoint=base
    )  # explicit: HF_ENDPOINT is read only when huggingface_hub is imported
    try:
        commit = api.repo_info(hub_id, revision=revision).sha
        tree = [
            f
            for f in api.list_repo_tree(hub_id, recursive=True, revision=commit)
            if isinstance(f, RepoFile)
        ]
    except (HfHubHTTPError, OSError) as exc:
        raise _hub_error(exc, hub_id, base) from exc
    except Exception as exc:  # httpx2 connection errors and the like
        raise _hub_error(exc, hub_id, base) from exc
    chosen = set(filter_repo_objects([f.path for f in tree], allow_patterns=allow_patterns))
    big = [f for f in tree if f.path in chosen and f.lfs and f.lfs.size >= RESUME_MIN_SIZE]
    headers = build_hf_headers()
    cache = _local_hash_cache(local_dir)
    for f in big:
        url = f"{base}/{hub_id}/resolve/{commit}/{_url_path(f.path)}"
        _fetch_resumable(
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
    except Exception as exc:
        raise _hub_error(exc, hub_id, base) from exc


def _url_path(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def _fetch_resumable(
    url: str,
    local_dir: Path,
    rel: str,
    size: int,
    sha256: str,
    commit: str,
    headers: dict[str, str],
    progress: bool,
    cache: HashCache,
) -> None:
    """Fetch one LFS file with HTTP Range, continuing a partial file left by an earlier process.

    Written by hand because huggingface_hub 2.4 names partial files per process and restarts
    them from zero. The partial file lives where hf keeps its own (``.cache/huggingface/download``)
    under a stable name; once complete and its sha256 checked, it moves into place and hf's
    metadata is written, so the following ``snapshot_download`` skips the file.
    """
    import requests
    from filelock import FileLock
    from tqdm.auto import tqdm

    dest = local_dir / rel
    meta_dir = local_dir / ".cache" / "huggingface" / "download"
    part = meta_dir / f"{rel}.{sha256}.dhllm.incomplete"
    part.parent.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(part) + ".lock"):
        if dest.is_file() and dest.stat().st_size == size and cache.digests(dest)[0] == sha256:
            _write_hf_metadata(local_dir, rel, commit, sha256)
            return
        for attempt in range(5):
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            if have == size:
                break
            request_headers = dict(headers, **({"Range": f"bytes={have}-"} if have else {}))
            try:
                with requests.get(url, headers=request_headers, stream=True, timeout=(10, 60)) as r:
                    if r.status_code == 200:
                        have = 0  # the server ignored Range: start over
                    elif r.status_code != 206:
                        raise DownloadError(f"GET {url} answered {r.status_code}: {r.text[:200]}")
                    with (
                        part.open("ab" if have else "wb") as fh,
                        tqdm(
                            total=size,
                            initial=have,
                            unit="B",
                            unit_scale=True,
                            unit_divisor=1024,
                            desc=rel + (" (resumed)" if have else ""),
                            disable=not progress,
                        ) as bar,
                    ):
                        for chunk in r.iter_content(chunk_size=2**20):
                            fh.write(chunk)
                            bar.update(len(chunk))
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == 4:
                    raise DownloadError(f"download of {rel} keeps failing: {exc}") from exc
        digest, sha1 = file_digests(part)
        if digest != sha256:
            part.unlink()
            raise DownloadError(
                f"{rel}: sha256 of the download ({digest[:16]}...) differs from the hub's "
                f"({sha256[:16]}...); the partial file was deleted, run the download again."
            )
        os.replace(part, dest)
        cache.record(dest, digest, sha1)
        _write_hf_metadata(local_dir, rel, commit, sha256)


def _write_hf_metadata(local_dir: Path, rel: str, commit: str, etag: str) -> None:
    try:  # private helper of huggingface_hub; without it hf just re-hashes the file once
        from huggingface_hub._local_folder import write_download_metadata
    except ImportError:
        return
    write_download_metadata(local_dir=local_dir, filename=rel, commit_hash=commit, etag=etag)


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
        raise _hub_error(exc, hub_id, base) from exc


GIT_LFS_MISSING = (
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
        raise DownloadError("git is not installed; use source='hf' instead (no git needed)")
    if not git_lfs_available():
        raise DownloadError(GIT_LFS_MISSING)
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")  # a private repo fails instead of hanging
    if (local_dir / ".git").is_dir():  # an earlier clone: fetch the missing LFS objects
        cmds = [["git", "-C", str(local_dir), "lfs", "pull"]]
    elif any(local_dir.iterdir()):
        raise DownloadError(f"{local_dir} is not empty and not a git clone; pick another local_dir")
    else:
        branch = ["--branch", revision] if revision else []
        cmds = [
            ["git", "lfs", "install", "--skip-repo"],
            ["git", "clone", *branch, _git_url(hub_id, base), str(local_dir)],
        ]
    for cmd in cmds:
        result = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise DownloadError(f"{' '.join(cmd)} failed: {result.stderr.strip()[-800:]}")
