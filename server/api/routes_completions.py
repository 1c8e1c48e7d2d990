"""POST /v1/completions: OpenAI's legacy completions, one engine request per (prompt, choice)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from server.api.auth import require_api_key
from server.api.generation import RequestContext, sampling_params
from server.api.results import collect, completion_logprobs, usage
from server.api.schemas import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
)
from server.api.streaming import SSEResponse, sse_stream
from server.engine_types import RequestOutput
from server.errors import InvalidRequest

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 429, 503)
}
MAX_CHOICES = 256  # engine requests one HTTP request may fan out to (prompts x n)
router = APIRouter(dependencies=[Depends(require_api_key)], tags=["inference"])


def prompt_token_ids(tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]],
                     ) -> list[list[int]]:
    """Every prompt form OpenAI accepts, as lists of token ids (the engine checks them)."""
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif not prompt:
        raise InvalidRequest("prompt is an empty list", param="prompt")
    elif isinstance(prompt[0], str):
        prompts = [tokenizer.encode(p) for p in prompt]
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    return prompts


def _sampling_fields(body: CompletionRequest) -> dict[str, Any]:
    return {
        "max_tokens": 16 if body.max_tokens is None else body.max_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed,
        "stop": body.stop, "stop_token_ids": body.stop_token_ids, "ignore_eos": body.ignore_eos,
        "logprobs": body.logprobs, "min_tokens": body.min_tokens,
    }


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    ctx = RequestContext.open(request, "completions", "cmpl", body.model, body.adapter_id)
    body.check_supported()
    if body.echo:
        raise InvalidRequest("echo is not supported", param="echo")
    prompts = prompt_token_ids(ctx.tokenizer, body.prompt)
    if len(prompts) * body.n > MAX_CHOICES:
        raise InvalidRequest(f"{len(prompts)} prompts x n={body.n} is more than {MAX_CHOICES} completions "
                             "in one request; split it", param="prompt")
    fields = _sampling_fields(body)
    group = ctx.group(request)
    for i, ids in enumerate(prompts):
        for j in range(body.n):
            group.add(f"{ctx.request_id}-{i * body.n + j}", ids, sampling_params(fields, j))
    await group.start()
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return SSEResponse(_stream(ctx, request, group, body.n, include_usage))
    try:
        results = await collect(group)
    finally:
        await group.close()
    tokenizer, want_logprobs = ctx.tokenizer, body.logprobs is not None
    choices = [
        CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason,
                         logprobs=completion_logprobs(tokenizer, r.logprobs) if want_logprobs else None)
        for i, r in enumerate(results)
    ]
    ctx.done(request, 200)
    return CompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.label, choices=choices,
                              usage=usage(group, body.n))


def _stream(ctx: RequestContext, request: Request, group: Any, n: int, include_usage: bool) -> Any:
    offsets = [0] * len(group.choices)
    want_logprobs = any(c.params.logprobs is not None for c in group.choices)

    def chunk(choices: list[CompletionChoice], **extra: Any) -> CompletionChunk:
        return CompletionChunk(id=ctx.request_id, created=ctx.created, model=ctx.label, choices=choices,
                               **extra)

    def render(index: int, out: RequestOutput) -> list[BaseModel]:
        if not out.new_text and not out.finished:
            return []
        lps = None
        if want_logprobs:
            lps = completion_logprobs(ctx.tokenizer, out.logprobs, offsets[index])
        offsets[index] += len(out.new_text)
        return [chunk([CompletionChoice(index=index, text=out.new_text, logprobs=lps,
                                        finish_reason=out.finish_reason if out.finished else None)])]

    def tail() -> list[BaseModel]:
        return [chunk([], usage=usage(group, n))] if include_usage else []

    return sse_stream(group, render, [], tail, lambda status: ctx.done(request, status))
