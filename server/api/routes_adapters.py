"""The adapter API: upload (validated, stored atomically, usable at once), list, inspect, delete.

Adapter ids match ``ADAPTER_ID_PATTERN`` (letters, digits, ``.``, ``_``, ``-``; no path separators,
no ``..``) and may not be the base model's id, since ``model`` can name either.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from adapter_store.store import ADAPTER_ID_PATTERN
from server.api.auth import require_admin_key, require_api_key
from server.api.schemas import AdapterCard, AdapterDeleted, AdapterList, ErrorResponse
from server.api.uploads import CONFIG_FILE, WEIGHTS_FILE, receive_upload
from server.engine_types import AdapterInfo
from server.errors import InvalidRequest

logger = logging.getLogger(__name__)
router = APIRouter(tags=["adapters"])

UPLOAD_DOC = f"""Upload a PEFT LoRA adapter as multipart/form-data: the files `{CONFIG_FILE}` and
`{WEIGHTS_FILE}` and the form field `adapter_id` (pattern `{ADAPTER_ID_PATTERN}`, no `..`). Add the
field `replace=true` to overwrite an existing id (requests already running keep the old weights).
The adapter is validated against the base model (modules, shapes, rank) before it is stored."""


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def adapter_card(info: AdapterInfo, parent: str) -> AdapterCard:
    return AdapterCard(id=info.adapter_id, uid=info.uid, parent=parent, rank=info.rank, alpha=info.alpha,
                       target_modules=list(info.target_modules), size_bytes=info.size_bytes,
                       checksum=info.checksum, location=info.location, requests_served=info.requests_served,
                       created=int(info.created))


@router.post("/v1/adapters", status_code=201, response_model=AdapterCard, description=UPLOAD_DOC,
             dependencies=[Depends(require_admin_key)], responses=_errors(400, 401, 409, 413, 422),
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["adapter_id", CONFIG_FILE, WEIGHTS_FILE],
                 "properties": {
                     "adapter_id": {"type": "string", "pattern": ADAPTER_ID_PATTERN},
                     "replace": {"type": "boolean", "default": False},
                     CONFIG_FILE: {"type": "string", "format": "binary"},
                     WEIGHTS_FILE: {"type": "string", "format": "binary"},
                 }}}}}})
async def upload_adapter(request: Request) -> JSONResponse:
    engine, settings = request.app.state.engine, request.app.state.settings
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adapter-upload-") as tmp:
        upload = await receive_upload(request, int(settings.max_upload_bytes), Path(tmp))
        request.state.adapter_id = upload.adapter_id
        if upload.adapter_id == engine.model_name:
            raise InvalidRequest(f"adapter id {upload.adapter_id!r} is the base model's id; choose another",
                                 param="adapter_id")
        info = await run_in_threadpool(engine.add_adapter, upload.adapter_id, Path(tmp), upload.replace)
    request.app.state.metrics.upload.observe(time.perf_counter() - started)
    logger.info("adapter stored: rank %d, %d bytes, sha256 %s", info.rank, info.size_bytes, info.checksum,
                extra={"request_id": "-", "adapter_id": info.adapter_id})
    card = adapter_card(info, engine.model_name)
    return JSONResponse(card.model_dump(), status_code=201)


@router.get("/v1/adapters", response_model=AdapterList, dependencies=[Depends(require_api_key)],
            responses=_errors(401))
async def list_adapters(request: Request) -> AdapterList:
    engine = request.app.state.engine
    return AdapterList(data=[adapter_card(i, engine.model_name) for i in engine.list_adapters()])


@router.get("/v1/adapters/{adapter_id}", response_model=AdapterCard, dependencies=[Depends(require_api_key)],
            responses=_errors(401, 404))
async def get_adapter(adapter_id: str, request: Request) -> AdapterCard:
    engine = request.app.state.engine
    return adapter_card(engine.get_adapter(adapter_id), engine.model_name)


@router.delete("/v1/adapters/{adapter_id}", response_model=AdapterDeleted,
               dependencies=[Depends(require_admin_key)], responses=_errors(401, 404))
async def delete_adapter(adapter_id: str, request: Request) -> AdapterDeleted:
    """Delete an adapter: new requests naming it get 404 at once; requests already running finish."""
    await run_in_threadpool(request.app.state.engine.remove_adapter, adapter_id)
    logger.info("adapter deleted", extra={"request_id": "-", "adapter_id": adapter_id})
    return AdapterDeleted(id=adapter_id)
