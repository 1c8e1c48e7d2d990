"""GET /v1/models: the base model and every adapter the caller may use, adapters with ``parent`` = the
base (vLLM's shape). A tenant's key sees the base model and that tenant's adapters only."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.api.auth import require_api_key
from server.api.schemas import ErrorResponse, ModelCard, ModelList
from server.api.tenants import Principal

router = APIRouter(tags=["inference"])


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
async def list_models(request: Request, principal: Principal = Depends(require_api_key)) -> ModelList:
    engine, settings = request.app.state.engine, request.app.state.settings
    base = engine.model_name
    cards = [ModelCard(id=base, created=request.app.state.started, root=settings.model or base,
                       max_model_len=engine.max_model_len)]
    for info in engine.list_adapters():
        if principal.sees(info.adapter_id):
            shown = principal.display(info.adapter_id)
            cards.append(ModelCard(id=shown, created=int(info.created), root=shown, parent=base,
                                   max_model_len=engine.max_model_len))
    return ModelList(data=cards)
