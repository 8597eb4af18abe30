"""Moved to ``helpers.background_server``; this alias lets branches written before the rename merge.

Delete it once nothing imports ``helpers.serving`` (today: the vLLM files, which are moving).
"""

from helpers.background_server import (  # noqa: F401
    PortInUseError,
    ServerHandle,
    ensure_port_free,
    free_port,
    start_uvicorn,
)
