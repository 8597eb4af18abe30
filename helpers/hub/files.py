"""What a model folder holds: LFS pointers, weight and tokenizer files, digests (cached)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

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
# LFS files at least this big are fetched by our own Range download (``resume.fetch_resumable``):
# huggingface_hub 2.4 restarts partial files from zero in a new process.
RESUME_MIN_SIZE = 1 * 2**20
HASH_CACHE_NAME = ".cache/dhllm/hashes.json"


class VerificationError(ValueError):
    """A downloaded folder is incomplete or broken; the message says which file and the fix."""


class DownloadError(RuntimeError):
    """A download failed; the message says why and what to try."""



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


def local_hash_cache(local_dir: Path) -> HashCache:
    return HashCache(local_dir, local_dir / HASH_CACHE_NAME)


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
