"""``create_app(engine, settings)``: the FastAPI app over an in-process engine.

The app's lifespan owns the engine loop: it starts the engine when the server starts. On shutdown
uvicorn first lets in-flight requests, streams included, finish (up to ``drain_timeout``) and then
cancels what is left, whose routes abort their engine requests; only then does the lifespan stop
the engine, without waiting any further, since no engine request can outlive its HTTP request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from server.api import routes_adapters, routes_chat, routes_completions, routes_models, routes_system
from server.api.errors import install_error_handlers
from server.api.guards import RequestGuard
from server.api.metrics import ServerMetrics
from server.api.quotas import RequestGate, StorageQuota
from server.api.served_by import ServedByMiddleware, default_replica_id
from server.api.tenants import Keyring
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

DESCRIPTION = """OpenAI-compatible completions and chat over one base model and many LoRA adapters.
Choose an adapter with `adapter_id` (or by naming it in `model`); manage adapters under `/v1/adapters`.
Errors use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""


def _streams_body(scope: Scope) -> bool:
    """Adapter uploads read their (large, multipart) body themselves; every other body is JSON."""
    return scope["method"] == "POST" and scope["path"] == "/v1/adapters"


def create_app(engine: Any, settings: ServerSettings, keyring: Keyring | None = None) -> FastAPI:
    """``keyring`` defaults to the keys in ``settings`` (raises KeysFileError on a bad keys file)."""
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
            logger.info("shutting down: stopping the engine")
            await run_in_threadpool(engine.shutdown, False)
            logger.info("engine stopped")

    app = FastAPI(title="lora-server", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.keyring = keyring or Keyring.from_settings(settings)
    app.state.request_gate = gate = RequestGate()
    app.state.storage_quota = StorageQuota()
    app.state.metrics = metrics = ServerMetrics(engine, gate.in_flight)
    app.state.on_request_error = metrics.on_request_error
    app.state.ready = False
    app.state.draining = False  # set by the server on SIGTERM, before uvicorn's drain starts
    app.state.started = int(time.time())
    install_error_handlers(app)
    for module in (routes_completions, routes_chat, routes_models, routes_adapters, routes_system):
        app.include_router(module.router)
    app.add_middleware(RequestGuard, max_request_bytes=int(settings.max_request_bytes),
                       read_timeout=settings.request_read_timeout, streamed_bodies=_streams_body)
    replica_id = settings.replica_id or default_replica_id(settings.port)
    app.add_middleware(ServedByMiddleware, replica_id=replica_id)
    return app
