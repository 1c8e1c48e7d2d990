"""GET /v1/models: the base model and every adapter, adapters with ``parent`` = the base (vLLM's shape)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.api.auth import require_api_key
from server.api.schemas import ErrorResponse, ModelCard, ModelList

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["inference"])


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
async def list_models(request: Request) -> ModelList:
    engine, settings = request.app.state.engine, request.app.state.settings
    base = engine.model_name
    cards = [ModelCard(id=base, created=request.app.state.started, root=settings.model or base,
                       max_model_len=engine.max_model_len)]
    for info in engine.list_adapters():
        cards.append(ModelCard(id=info.adapter_id, created=int(info.created), root=info.adapter_id,
                               parent=base, max_model_len=engine.max_model_len))
    return ModelList(data=cards)
