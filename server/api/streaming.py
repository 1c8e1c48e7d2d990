"""Server-sent events in OpenAI's chunk format: ``data: {json}\\n\\n`` per chunk, then ``data: [DONE]``.

Errors after the stream has started can't change the status code any more, so they are sent as an
``{"error": ...}`` event followed by ``[DONE]`` (what OpenAI-compatible clients expect).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import ClientDisconnected, error_body, server_error_body
from server.api.generation import GenerationGroup
from server.engine_types import RequestOutput
from server.errors import ServerError

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx must not buffer SSE


class SSEResponse(StreamingResponse):
    """A stream of SSE events whose generator is always closed when the response ends.

    When the client disconnects, Starlette cancels the send loop and leaves the generator suspended
    at a ``yield``; its ``finally`` (abort the engine requests, count the request) would then run
    only whenever the generator is garbage-collected. Closing it here makes that immediate.
    """

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def sse_stream(
    group: GenerationGroup,
    render: Callable[[int, RequestOutput], list[BaseModel]],
    head: list[BaseModel],
    tail: Callable[[], list[BaseModel]],
    on_end: Callable[[int], None],
) -> AsyncGenerator[str, None]:
    """Stream ``head``, then ``render(index, output)`` for every output, then ``tail()`` and [DONE].

    ``on_end(status)`` is called exactly once: 200, the error's status, or 499 if the client left
    (the stream is then cancelled by Starlette; ``group.close()`` aborts the engine requests).
    """
    status = ClientDisconnected.status
    try:
        for chunk in head:
            yield sse(chunk)
        async for index, out in group.events():
            for chunk in render(index, out):
                yield sse(chunk)
        for chunk in tail():
            yield sse(chunk)
        yield DONE
        status = 200
    except ClientDisconnected:
        pass
    except ServerError as exc:
        status = exc.status
        yield sse(server_error_body(exc))
        yield DONE
    except Exception:
        status = 500
        logger.exception("stream failed", extra={"request_id": group.choices[0].request_id,
                                                 "adapter_id": group.adapter_id or "-"})
        yield sse(error_body("internal server error; the details are in the server log", "server_error",
                             "internal_error", None))
        yield DONE
    finally:
        await group.close()
        on_end(status)
