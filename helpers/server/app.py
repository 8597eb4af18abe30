"""``create_app(chat_model, settings) -> FastAPI``: the chapter's ``POST /`` and OpenAI's ``/v1``
(chat, models, and ``/v1/audio/speech`` for the digital human's voice).

No module globals: each app owns its engine, settings and model, so two apps in one process
share nothing. Generation runs in the engine (a worker thread, or another process for vLLM);
handlers only await results, so ``/health`` answers in milliseconds while the model is busy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from helpers.chat.base import ChatModel
from helpers.config import Settings, get_settings
from helpers.server import protocol as p
from helpers.server.context import ServerContext
from helpers.server.engine import Engine, create_engine
from helpers.server.errors import install_error_handlers
from helpers.server.middleware import RequestMiddleware
from helpers.server.routes import linly, openai, speech


def create_app(chat_model: ChatModel, settings: Settings | None = None,
               engine: Engine | None = None) -> FastAPI:
    """A FastAPI app serving ``chat_model``; nothing is shared with other apps.

    ``engine``: how requests run; by default the builtin one that fits the model (continuous
    batching for a local model that can batch, a thread pool otherwise).
    """
    settings = settings or get_settings()
    if engine is None:
        engine = create_engine(chat_model, settings)
    ctx = ServerContext(chat_model, engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="dhllm",
        description=(
            "The chapter's `POST /` (prompt, history) and an OpenAI-compatible `/v1` API for "
            f"the model `{ctx.model_name}`. Concurrent requests are batched together."
        ),
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.engine = engine  # tests and notebooks read its stats
    app.add_middleware(RequestMiddleware, settings=settings)
    install_error_handlers(app)

    @app.get("/health", response_model=p.Health, tags=["meta"])
    async def health(request: Request) -> p.Health:
        """Always open (no API key), cheap: for load balancers and notebooks."""
        # From the app's state, not a closure: FastAPI caches endpoint functions process-wide
        # (an lru_cache), so a closure over ctx would keep the model on the GPU after stop().
        state = request.app.state
        replicas = getattr(state.engine, "replica_health", None)  # vLLM replicas behind a router
        return p.Health(model=state.ctx.model_name, engine=state.engine.kind,
                        stats=state.engine.stats.as_dict(),
                        replicas=replicas() if replicas is not None else None)

    app.include_router(linly.router)
    app.include_router(openai.router)
    app.include_router(speech.router)
    return app
