"""``RequestGuard``: the outermost ASGI layer, bounding what one request may cost before any route runs.

- Headers: one header over ``MAX_HEADER_BYTES`` or all over ``MAX_HEADERS_BYTES`` is 431, naming
  the header (nginx's defaults are of the same order). uvicorn's own parser cap sits above these
  (``H11_MAX_INCOMPLETE_BYTES``, set in ``server/__main__.py``) and resets what is bigger still.
- Bodies: every request's body must arrive within ``request_read_timeout`` seconds (408 and the
  connection closed), so a client trickling bytes can't hold a connection and its memory forever.
  JSON bodies are read here, up to ``max_request_bytes`` (413 beyond, checked while reading), and
  replayed to the route; upload bodies stream through (their cap is in ``uploads.py``, whose parser
  sees the same timeout as a ``RequestTimeout`` raised from ``receive``).
- Clean-ups: a route may append callables to ``request.state.cleanups``; they run once the
  response has been sent or the client has gone, whatever path the request took (a tenant's
  concurrency slot is released this way even for a stream cut short).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import to_response
from server.errors import HeadersTooLarge, PayloadTooLarge, RequestTimeout, ServerError

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 8 * 1024
MAX_HEADERS_BYTES = 32 * 1024
H11_MAX_INCOMPLETE_BYTES = 64 * 1024
DRAIN_LIMIT = 64 * 2**20  # after a refusal, read and drop at most this much so the client sees the answer
CLEANUPS = "cleanups"


def check_headers(headers: list[tuple[bytes, bytes]]) -> None:
    total = 0
    for name, value in headers:
        size = len(name) + len(value)
        total += size
        if size > MAX_HEADER_BYTES:
            field = name.decode("latin-1")
            raise HeadersTooLarge(f"request header {field!r} is {size} bytes; the limit is "
                                  f"{MAX_HEADER_BYTES}", param=field)
    if total > MAX_HEADERS_BYTES:
        raise HeadersTooLarge(f"request headers total {total} bytes; the limit is {MAX_HEADERS_BYTES}",
                              param="headers")


def timed_receive(receive: Receive, deadline: float, limit: float) -> Receive:
    """``receive`` that raises RequestTimeout once the body is still incomplete at ``deadline``."""
    done = False

    async def wrapped() -> Message:
        nonlocal done
        if done:  # the body is complete: what follows is http.disconnect, which may take forever
            return await receive()
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(receive(), max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {limit:g} s "
                                 "(request_read_timeout)", param="body") from None
        done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return wrapped


async def drain(receive: Receive, budget: int) -> None:
    """Read and drop up to ``budget`` bytes of body, so the client reads our answer, not a reset."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def read_body(receive: Receive, cap: int, declared: int | None) -> bytes:
    if declared is not None and declared > cap:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {cap} bytes "
                              "(max_request_bytes)", param="body")
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b""  # the client left; the route will see http.disconnect
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > cap:
            raise PayloadTooLarge(f"request body of more than {cap} bytes is over the limit "
                                  "(max_request_bytes)", param="body")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def wrapped() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped


class RequestGuard:
    def __init__(self, app: ASGIApp, max_request_bytes: int, read_timeout: float,
                 streamed_bodies: Callable[[Scope], bool]) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.read_timeout = read_timeout
        self.streamed_bodies = streamed_bodies  # requests whose route reads the body itself

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cleanups = scope.setdefault("state", {}).setdefault(CLEANUPS, [])
        deadline = asyncio.get_running_loop().time() + self.read_timeout
        receive = timed_receive(receive, deadline, self.read_timeout)
        try:
            try:
                check_headers(scope["headers"])
                if not self.streamed_bodies(scope):
                    receive = replay(await read_body(receive, self.max_request_bytes, _declared(scope)),
                                     receive)
            except ServerError as exc:
                await self._refuse(exc, scope, receive, send)
                return
            await self.app(scope, receive, send)
        finally:
            for cleanup in cleanups:
                cleanup()

    async def _refuse(self, exc: ServerError, scope: Scope, receive: Receive, send: Send) -> None:
        logger.info("request refused: %s", exc.message,
                    extra={"path": scope.get("path"), "status": exc.status})
        if isinstance(exc, PayloadTooLarge):
            declared = _declared(scope)
            if declared is None or declared - self.max_request_bytes <= DRAIN_LIMIT:
                try:
                    await drain(receive, DRAIN_LIMIT)
                except RequestTimeout:
                    pass
        await to_response(exc)(scope, receive, send)


def _declared(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
