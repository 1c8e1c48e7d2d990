"""``create_app(engine, settings)``: the FastAPI app over an in-process engine.

The app's lifespan owns the engine loop: it starts the engine when the server starts, and on
shutdown (after uvicorn has let in-flight requests finish, up to ``drain_timeout``) it shuts the
engine down with ``drain=True`` so nothing already admitted is dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from server.api import routes_adapters, routes_chat, routes_completions, routes_models, routes_system
from server.api.errors import install_error_handlers
from server.api.metrics import ServerMetrics
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

DESCRIPTION = """OpenAI-compatible completions and chat over one base model and many LoRA adapters.
Choose an adapter with `adapter_id` (or by naming it in `model`); manage adapters under `/v1/adapters`.
Errors use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""


def create_app(engine: Any, settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        app.state.ready = True
        logger.info("serving %s (max_model_len=%d, %d adapters stored)", engine.model_name,
                    engine.max_model_len, len(engine.list_adapters()))
        try:
            yield
        finally:
            app.state.ready = False
            logger.info("shutting down: draining the engine")
            await run_in_threadpool(engine.shutdown, True)
            logger.info("engine stopped")

    app = FastAPI(title="lora-server", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics = ServerMetrics(engine)
    app.state.on_request_error = metrics.on_request_error
    app.state.ready = False
    app.state.started = int(time.time())
    install_error_handlers(app)
    for module in (routes_completions, routes_chat, routes_models, routes_adapters, routes_system):
        app.include_router(module.router)
    return app
