"""The adapter API: upload (validated, stored atomically, usable at once), list, inspect, delete.

Adapter ids match ``ADAPTER_ID_PATTERN`` (letters, digits, ``.``, ``_``, ``-``; no path separators,
no ``..``) and may not be the base model's id, since ``model`` can name either. A tenant's key works
in that tenant's namespace: it names its adapters plainly, sees only them, and another tenant's
adapter of the same name is, to it, missing (404). A global key names a tenant's adapter
``tenant:name`` (and may upload one for a tenant that way).
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

from adapter_store.failpoints import failpoint
from adapter_store.tenancy import ADAPTER_ID_PATTERN, split
from server import openmp
from server.api.auth import require_admin_key, require_api_key
from server.api.schemas import AdapterCard, AdapterDeleted, AdapterList, AdapterPartCard, ErrorResponse
from server.api.tenants import Principal
from server.api.uploads import CONFIG_FILE, OPTIONAL_FILES, WEIGHTS_FILE, receive_upload
from server.engine_types import AdapterInfo
from server.errors import AdapterExists, InvalidRequest, UnknownAdapter

logger = logging.getLogger(__name__)
router = APIRouter(tags=["adapters"])

UPLOAD_DOC = f"""Upload a PEFT LoRA adapter as multipart/form-data: the files `{CONFIG_FILE}` and
`{WEIGHTS_FILE}` and the form field `adapter_id` (pattern `{ADAPTER_ID_PATTERN}`, no `..`). Add the
field `replace=true` to overwrite an existing id (requests already running keep the old weights).
The adapter is validated against the base model (modules, shapes, rank) before it is stored. An
adapter with its own tokenizer (tokens added, `modules_to_save` embeddings) may include its files
({", ".join(f"`{n}`" for n in OPTIONAL_FILES)}); its requests are then tokenized with it."""


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def adapter_card(info: AdapterInfo, parent: str, principal: Principal) -> AdapterCard:
    parts = [AdapterPartCard(name=p.name, modules=list(p.modules), rank=p.rank, bytes=p.bytes,
                             pool_bytes=p.pool_bytes, full_copy=p.full_copy) for p in info.parts]
    return AdapterCard(id=principal.display(info.adapter_id), tenant=split(info.adapter_id)[0], uid=info.uid,
                       parent=parent, rank=info.rank, alpha=info.alpha,
                       target_modules=list(info.target_modules), size_bytes=info.size_bytes,
                       checksum=info.checksum, location=info.location, requests_served=info.requests_served,
                       created=int(info.created), use_dora=info.use_dora, parts=parts,
                       pool_bytes=info.pool_bytes, vocab_size=info.vocab_size)


def _visible(engine: Any, principal: Principal, name: str) -> AdapterInfo:
    try:
        return engine.get_adapter(principal.stored_id(name))
    except UnknownAdapter:
        raise UnknownAdapter(name) from None


@router.post("/v1/adapters", status_code=201, response_model=AdapterCard, description=UPLOAD_DOC,
             responses=_errors(400, 401, 403, 408, 409, 413, 422, 429),
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["adapter_id", CONFIG_FILE, WEIGHTS_FILE],
                 "properties": {
                     "adapter_id": {"type": "string", "pattern": ADAPTER_ID_PATTERN},
                     "replace": {"type": "boolean", "default": False},
                     CONFIG_FILE: {"type": "string", "format": "binary"},
                     WEIGHTS_FILE: {"type": "string", "format": "binary"},
                 }}}}}})
async def upload_adapter(request: Request, principal: Principal = Depends(require_admin_key)) -> JSONResponse:
    state = request.app.state
    engine, settings = state.engine, state.settings
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adapter-upload-") as tmp:
        upload = await receive_upload(request, int(settings.max_upload_bytes), Path(tmp))
        failpoint("upload.received")
        stored = principal.stored_id(upload.adapter_id)
        request.state.adapter_id = stored
        if split(stored)[1] == engine.model_name:
            raise InvalidRequest(f"adapter id {upload.adapter_id!r} is the base model's id; choose another",
                                 param="adapter_id")
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())

        def store() -> AdapterInfo:  # off the event loop: the quota lists what is stored
            openmp.single_threaded()  # a worker thread: only the engine's thread keeps an OpenMP team
            with state.storage_quota.reserve(principal, stored, size, engine.list_adapters):
                return engine.add_adapter(stored, Path(tmp), upload.replace)

        try:
            info = await run_in_threadpool(store)
        except AdapterExists:
            raise AdapterExists(upload.adapter_id) from None
    failpoint("upload.committed")
    state.metrics.upload.observe(time.perf_counter() - started)
    logger.info("adapter stored: rank %d, %d bytes, sha256 %s", info.rank, info.size_bytes, info.checksum,
                extra={"request_id": "-", "adapter_id": info.adapter_id})
    card = adapter_card(info, engine.model_name, principal)
    return JSONResponse(card.model_dump(), status_code=201)


@router.get("/v1/adapters", response_model=AdapterList, responses=_errors(401))
async def list_adapters(request: Request, principal: Principal = Depends(require_api_key)) -> AdapterList:
    engine = request.app.state.engine
    return AdapterList(data=[adapter_card(i, engine.model_name, principal) for i in engine.list_adapters()
                             if principal.sees(i.adapter_id)])


@router.get("/v1/adapters/{adapter_id}", response_model=AdapterCard, responses=_errors(400, 401, 404))
async def get_adapter(adapter_id: str, request: Request,
                      principal: Principal = Depends(require_api_key)) -> AdapterCard:
    engine = request.app.state.engine
    return adapter_card(_visible(engine, principal, adapter_id), engine.model_name, principal)


@router.delete("/v1/adapters/{adapter_id}", response_model=AdapterDeleted,
               responses=_errors(400, 401, 403, 404))
async def delete_adapter(adapter_id: str, request: Request,
                         principal: Principal = Depends(require_admin_key)) -> AdapterDeleted:
    """Delete an adapter: new requests naming it get 404 at once; requests already running finish."""
    stored = principal.stored_id(adapter_id)
    try:
        await run_in_threadpool(request.app.state.engine.remove_adapter, stored)
    except UnknownAdapter:
        raise UnknownAdapter(adapter_id) from None
    logger.info("adapter deleted", extra={"request_id": "-", "adapter_id": stored})
    return AdapterDeleted(id=adapter_id)
