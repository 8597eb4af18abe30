"""Downloads from Hugging Face, hf-mirror, ModelScope or git; ``verify`` of a local folder.

Knows nothing of HTTP serving. (Placeholder until the downloads issue lands: only ``verify``.)
"""

from __future__ import annotations

from pathlib import Path

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"


class VerificationError(ValueError):
    """A downloaded folder is incomplete or broken; the message says which file and the fix."""


def verify(local_dir: str | Path, repo_id: str | None = None, quick: bool = False) -> Path:
    """Check that ``local_dir`` holds real weight files, not git-lfs pointers."""
    local_dir = Path(local_dir)
    for path in sorted(local_dir.rglob("*")):
        if path.is_file() and path.stat().st_size < 1024:
            with path.open("rb") as fh:
                if fh.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
                    raise VerificationError(
                        f"{path} is a git-lfs pointer file, not the real file. Fix: "
                        f"cd {local_dir} && git lfs install && git lfs pull"
                    )
    return local_dir
