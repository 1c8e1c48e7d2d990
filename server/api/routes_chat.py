"""POST /v1/chat/completions: the model's own chat template, then the same engine path as completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from server.api.auth import require_api_key
from server.api.generation import RequestContext, sampling_params
from server.api.results import chat_logprobs, collect, usage
from server.api.routes_completions import ERRORS
from server.api.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
)
from server.api.streaming import SSEResponse, sse_stream
from server.engine_types import RequestOutput
from server.errors import InvalidRequest

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["inference"])


def _sampling_fields(body: ChatCompletionRequest, max_tokens: int) -> dict[str, Any]:
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return {
        "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
        "top_k": body.top_k, "seed": body.seed, "stop": body.stop, "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos, "logprobs": logprobs, "min_tokens": body.min_tokens,
    }


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    ctx = RequestContext.open(request, "chat", "chatcmpl", body.model, body.adapter_id)
    body.check_supported()
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    ids = ctx.tokenizer.apply_chat_template(messages)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.max_completion_tokens is not None and body.max_completion_tokens < 1:  # name the field sent
        raise InvalidRequest("max_completion_tokens must be an integer >= 1, got "
                             f"{body.max_completion_tokens}", param="max_completion_tokens")
    # No max_tokens: the completion may use whatever context the prompt leaves (vLLM's default).
    max_tokens = requested if requested is not None else max(1, ctx.engine.max_model_len - len(ids))
    group = ctx.group(request)
    for j in range(body.n):
        group.add(f"{ctx.request_id}-{j}", ids, sampling_params(_sampling_fields(body, max_tokens), j))
    await group.start()
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return SSEResponse(_stream(ctx, request, group, body.logprobs, include_usage))
    try:
        results = await collect(group)
    finally:
        await group.close()
    choices = [
        ChatChoice(index=i, message=ChatResponseMessage(content=r.text), finish_reason=r.finish_reason,
                   logprobs=chat_logprobs(ctx.tokenizer, r.logprobs) if body.logprobs else None)
        for i, r in enumerate(results)
    ]
    ctx.done(request, 200)
    return ChatCompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.label, choices=choices,
                                  usage=usage(group, body.n))


def _stream(ctx: RequestContext, request: Request, group: Any, logprobs: bool, include_usage: bool) -> Any:
    def chunk(choices: list[ChatChunkChoice], **extra: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=ctx.request_id, created=ctx.created, model=ctx.label, choices=choices,
                                   **extra)

    # OpenAI opens every choice with a role-only delta.
    head: list[BaseModel] = [
        chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))])
        for c in group.choices
    ]

    def render(index: int, out: RequestOutput) -> list[BaseModel]:
        if not out.new_text and not out.finished:
            return []
        lps = chat_logprobs(ctx.tokenizer, out.logprobs) if logprobs else None
        delta = ChatDelta(content=out.new_text) if out.new_text else ChatDelta()
        return [chunk([ChatChunkChoice(index=index, delta=delta, logprobs=lps,
                                       finish_reason=out.finish_reason if out.finished else None)])]

    def tail() -> list[BaseModel]:
        return [chunk([], usage=usage(group, len(group.choices)))] if include_usage else []

    return sse_stream(group, render, head, tail, lambda status: ctx.done(request, status))
