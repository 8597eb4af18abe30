"""Cross-process resume of large files: HTTP Range into huggingface_hub's own folder layout."""

from __future__ import annotations

import os
from pathlib import Path

from helpers.hub.files import DownloadError, HashCache, file_digests

RETRIES = 5  # attempts per file; each resumes where the last one stopped


def url_path(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def fetch_resumable(
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
    from filelock import FileLock

    dest = local_dir / rel
    part = local_dir / ".cache" / "huggingface" / "download" / f"{rel}.{sha256}.dhllm.incomplete"
    part.parent.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(part) + ".lock"):
        if dest.is_file() and dest.stat().st_size == size and cache.digests(dest)[0] == sha256:
            write_hf_metadata(local_dir, rel, commit, sha256)
            return
        _fetch_with_retries(url, part, rel, size, headers, progress)
        digest, sha1 = file_digests(part)
        if digest != sha256:
            part.unlink()
            raise DownloadError(
                f"{rel}: sha256 of the download ({digest[:16]}...) differs from the hub's "
                f"({sha256[:16]}...); the partial file was deleted, run the download again."
            )
        os.replace(part, dest)
        cache.record(dest, digest, sha1)
        write_hf_metadata(local_dir, rel, commit, sha256)


def _fetch_with_retries(
    url: str, part: Path, rel: str, size: int, headers: dict[str, str], progress: bool
) -> None:
    """Append to ``part`` until it has ``size`` bytes; a dropped connection resumes after a pause."""
    import requests
    from tenacity import (
        RetryError,
        retry,
        retry_if_exception_type,
        stop_after_attempt,
        wait_exponential,
    )

    # Each retry continues from the bytes already on disk, so a flaky line makes progress.
    @retry(retry=retry_if_exception_type((requests.ConnectionError, requests.Timeout)),
           stop=stop_after_attempt(RETRIES), wait=wait_exponential(multiplier=0.5, max=8))
    def attempt() -> None:
        _fetch_range(url, part, rel, size, headers, progress)

    try:
        attempt()
    except RetryError as exc:
        cause = exc.last_attempt.exception()
        raise DownloadError(f"download of {rel} keeps failing: {cause}") from cause


def _fetch_range(
    url: str, part: Path, rel: str, size: int, headers: dict[str, str], progress: bool
) -> None:
    """One GET from the bytes ``part`` already has to the end of the file."""
    import requests
    from tqdm.auto import tqdm

    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return
    request_headers = dict(headers, **({"Range": f"bytes={have}-"} if have else {}))
    with requests.get(url, headers=request_headers, stream=True, timeout=(10, 60)) as r:
        if r.status_code == 200:
            have = 0  # the server ignored Range: start over
        elif r.status_code != 206:
            raise DownloadError(f"GET {url} answered {r.status_code}: {r.text[:200]}")
        bar = tqdm(total=size, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=rel + (" (resumed)" if have else ""), disable=not progress)
        with part.open("ab" if have else "wb") as fh, bar:
            for chunk in r.iter_content(chunk_size=2**20):
                fh.write(chunk)
                bar.update(len(chunk))


def write_hf_metadata(local_dir: Path, rel: str, commit: str, etag: str) -> None:
    """Record a file as ``hf download --local-dir`` does, so hf skips it next time."""
    # A private helper of huggingface_hub (no public API writes this record); the test
    # test_hf_reads_the_metadata_we_record pins the behaviour. Without it hf re-hashes the file once.
    try:
        from huggingface_hub._local_folder import write_download_metadata
    except ImportError:
        return
    write_download_metadata(local_dir=local_dir, filename=rel, commit_hash=commit, etag=etag)
