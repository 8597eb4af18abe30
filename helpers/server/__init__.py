"""The API server: the chapter's ``POST /`` and an OpenAI-compatible ``/v1``.

Import-light on purpose (no torch, no FastAPI at import time): ``create_app``, ``serve`` and
``serve_in_background`` import what they need when called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from helpers.background_server import (
    PortInUseError,
    ServerHandle,
    StoppingServer,
    display_url,
    ensure_port_free,
    start_uvicorn,
)
from helpers.config import get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from helpers.chat.base import ChatModel
    from helpers.config import Settings
    from helpers.server.engine import Engine

__all__ = [
    "PortInUseError",
    "ServerHandle",
    "create_app",
    "serve",
    "serve_in_background",
    "start_uvicorn",
]


def create_app(chat_model: ChatModel, settings: Settings | None = None,
               engine: Engine | None = None) -> FastAPI:
    """A FastAPI app serving ``chat_model`` (see ``helpers.server.app``)."""
    from helpers.server.app import create_app as _create_app

    return _create_app(chat_model, settings, engine)


def serve_in_background(
    app_or_model: Any, host: str = "127.0.0.1", port: int | None = None, **settings: Any
) -> ServerHandle:
    """Serve an app or a ChatModel from a daemon thread; return once ``/health`` answers.

    ``settings`` override ``helpers.config.Settings`` fields (``api_key``, ``max_batch_size``,
    ...) when a ChatModel is given. Raises PortInUseError at once when the port is taken.
    """
    from helpers.chat.base import ChatModel

    port = get_settings().port if port is None else port
    app = app_or_model
    if isinstance(app_or_model, ChatModel):
        app = create_app(app_or_model, get_settings(host=host, port=port, **settings))
    elif settings:
        raise TypeError("settings apply only when a ChatModel is given; build the app with them")
    return start_uvicorn(app, host=host, port=port, before_shutdown=_engine_stopper(app))


def _engine_stopper(app: Any) -> Callable[[], None] | None:
    """The app's ``engine.stop`` (dhllm's apps), run before uvicorn waits for open requests."""
    engine = getattr(getattr(app, "state", None), "engine", None)
    return engine.stop if engine is not None else None


def serve(
    model_spec: str = "embedded",
    host: str = "127.0.0.1",
    port: int | None = None,
    api_key: str | None = None,
    log_prompts: bool = False,
    engine: str = "builtin",
    replicas: int | None = None,
    policy: str | None = None,
) -> None:
    """Load ``model_spec`` and serve it until Ctrl-C (the ``dhllm serve`` command).

    ``engine``: ``builtin`` (our continuous batching, in this process) or ``vllm`` (vLLM in
    its own venv as a subprocess, stopped with the server). ``replicas`` > 1 (vLLM only):
    that many vLLM replicas behind vllm-router, routed by ``policy`` (default cache_aware).
    """
    import logging

    import uvicorn

    from helpers.chat import get_chat_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("dhllm.server").setLevel(logging.INFO)
    overrides: dict[str, Any] = {"host": host, "log_prompts": log_prompts}
    if port is not None:
        overrides["port"] = port
    if api_key:
        overrides["api_key"] = api_key
    if replicas is not None:
        overrides["vllm_replicas"] = replicas
    if policy:
        overrides["vllm_policy"] = policy
    settings = get_settings(**overrides)
    if settings.vllm_replicas > 1 and engine != "vllm":
        raise ValueError("--replicas runs several vLLM servers: add --engine vllm")
    ensure_port_free(host, settings.port)  # fail before minutes of model loading, not after
    if engine == "vllm":
        from helpers.server.vllm.launch import start_vllm_engine

        chat_model, runner = start_vllm_engine(model_spec, settings, progress=print)
        app = create_app(chat_model, settings, engine=runner)
    elif engine == "builtin":
        app = create_app(get_chat_model(model_spec), settings)
    else:
        raise ValueError(f"engine must be 'builtin' or 'vllm', not {engine!r}")
    url = display_url(host, settings.port)
    print(f"正在提供 {model_spec}：{url}（接口文档：{url}/docs）")
    try:
        config = uvicorn.Config(app, host=host, port=settings.port, log_level="warning")
        StoppingServer(config, before_shutdown=app.state.engine.stop).run()
    finally:
        app.state.engine.stop()  # vLLM too; idempotent after the app's own shutdown
