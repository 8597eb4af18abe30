"""Getting model files: downloads (hf, hf-mirror, ModelScope, git), ``verify``, the local mirror,
and where a model is (``find_hub``: the first hub that answers; ``local_copy``: a verified folder).

Knows nothing of chat models or of the API server. Takes hub ids (``org/name``); the registry's
short names (``linly-7b``) are resolved one layer up, by ``helpers.models.hub_id``.
"""

from helpers.hub.commands import download_command
from helpers.hub.download import GIT_LFS_MISSING, download, git_lfs_available
from helpers.hub.files import DownloadError, VerificationError, is_lfs_pointer
from helpers.hub.locate import find_hub, local_copy
from helpers.hub.sources import (
    HF_ENDPOINT,
    HF_MIRROR_ENDPOINT,
    MODELSCOPE_ENDPOINT,
    SOURCES,
    Source,
    endpoint_for,
    hub_reachable,
)
from helpers.hub.verify import remote_manifest, verify

__all__ = [
    "GIT_LFS_MISSING",
    "HF_ENDPOINT",
    "HF_MIRROR_ENDPOINT",
    "MODELSCOPE_ENDPOINT",
    "SOURCES",
    "DownloadError",
    "Source",
    "VerificationError",
    "download",
    "download_command",
    "endpoint_for",
    "find_hub",
    "git_lfs_available",
    "hub_reachable",
    "is_lfs_pointer",
    "local_copy",
    "remote_manifest",
    "verify",
]
