"""The API server: the chapter's ``POST /`` and an OpenAI-compatible ``/v1``.

(Placeholder: the server issue fills in ``create_app`` and ``serve_in_background``.)
"""

from helpers.server.background import PortInUseError, ServerHandle, start_uvicorn

__all__ = ["PortInUseError", "ServerHandle", "start_uvicorn"]
