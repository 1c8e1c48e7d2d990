"""``X-Served-By: <replica id>`` on every response, so a client (or a test) behind a load balancer
can tell which replica answered. A plain ASGI middleware: it touches only the response start, so
streamed responses pass through unbuffered."""

from __future__ import annotations

import socket

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-served-by"


def default_replica_id(port: int) -> str:
    """``<hostname>:<port>``: the pod or container name under an orchestrator, unique on one host."""
    return f"{socket.gethostname()}:{port}"


class ServedByMiddleware:
    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app = app
        self.header = (HEADER, replica_id.encode("latin-1", "replace"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)
