"""Where a model's files are: a verified local copy, or the first hub that answers.

Takes hub ids (``org/name``); the registry's short names are mapped one layer up, in
``helpers.models``. Reads ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` / ``DHLLM_OFFLINE`` through
``helpers.config.Settings``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from helpers.config import get_settings
from helpers.hub.files import VerificationError
from helpers.hub.sources import (
    HF_ENDPOINT,
    HF_MIRROR_ENDPOINT,
    MODELSCOPE_ENDPOINT,
    default_local_dir,
    hub_reachable,
)
from helpers.hub.verify import verify

HUB_PROBE_TIMEOUT = 1.5  # seconds per hub: a blocked huggingface.co must not stall the setup cell


def local_copy(repo_ids: Sequence[str]) -> Path | None:
    """The first downloaded folder of one of ``repo_ids`` that passes a quick verify, or None.

    Looks in ``models/<name part of the id>`` (relative to the working directory, as the
    chapter's ``--local-dir``), then in ``<cache_dir>/downloads/<org>/<name>``.
    """
    candidates = [Path("models") / i.split("/")[-1] for i in repo_ids]
    candidates += [default_local_dir(i) for i in repo_ids]
    for folder in dict.fromkeys(candidates):
        if (folder / "config.json").is_file():
            try:
                return verify(folder, quick=True)
            except VerificationError:
                continue  # half-downloaded or git-lfs pointers: not usable as is
    return None


def find_hub(online: bool | None = None, timeout: float = HUB_PROBE_TIMEOUT) -> tuple[str, str] | None:
    """``(source, endpoint)`` of the first hub that answers; None when offline.

    ``HF_ENDPOINT``, when set (a mirror, a classroom server), is the only one tried; otherwise
    huggingface.co, hf-mirror.com (reachable from mainland China), then ModelScope. Offline:
    ``online=False``, ``DHLLM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``; ``online=True`` skips the probe.
    """
    settings = get_settings()
    if online is False or (online is None and settings.offline_mode()):
        return None
    custom = settings.hf_endpoint
    hubs = [("hf", custom.rstrip("/"))] if custom else [
        ("hf", HF_ENDPOINT), ("hf-mirror", HF_MIRROR_ENDPOINT), ("modelscope", MODELSCOPE_ENDPOINT)]
    if online:
        return hubs[0]
    return next(((s, url) for s, url in hubs if hub_reachable(url, timeout=timeout)), None)
