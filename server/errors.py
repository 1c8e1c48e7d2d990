"""Typed errors. Each carries what a caller needs; ``server/api`` maps them to HTTP in one place."""

from __future__ import annotations


class ServerError(Exception):
    """Base class. ``status`` is the HTTP status the API answers with."""

    status: int = 500
    code: str = "internal_error"
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServerError):
    status, code, type = 400, "invalid_request", "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(ServerError):
    status, code, type = 401, "invalid_api_key", "authentication_error"


class UnknownAdapter(ServerError):
    status, code, type = 404, "adapter_not_found", "not_found_error"

    def __init__(self, adapter_id: str, known: list[str] | None = None) -> None:
        hint = f"; known adapters: {', '.join(sorted(known)[:20])}" if known else ""
        super().__init__(f"adapter {adapter_id!r} does not exist{hint}", param="adapter_id")
        self.adapter_id = adapter_id


class AdapterExists(ServerError):
    status, code, type = 409, "adapter_exists", "conflict_error"

    def __init__(self, adapter_id: str) -> None:
        super().__init__(
            f"adapter {adapter_id!r} already exists; delete it first or upload with replace=true",
            param="adapter_id",
        )
        self.adapter_id = adapter_id


class PayloadTooLarge(ServerError):
    status, code, type = 413, "payload_too_large", "invalid_request_error"


class InvalidAdapter(ServerError):
    """The adapter files are malformed or describe something we refuse to serve (422)."""

    status, code, type = 422, "invalid_adapter", "invalid_request_error"


class AdapterIncompatible(InvalidAdapter):
    """A well-formed adapter that does not fit the loaded base model (shapes, modules, rank)."""

    code = "adapter_incompatible"


class AdapterTooLarge(InvalidAdapter):
    """The adapter needs more pages than the whole pool has."""

    code = "adapter_too_large"


class Overloaded(ServerError):
    status, code, type = 503, "overloaded", "server_error"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
