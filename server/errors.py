"""Typed errors. Each carries what a caller needs; ``server/api`` maps them to HTTP in one place."""

from __future__ import annotations


class ServerError(Exception):
    """Base class. ``status`` is the HTTP status the API answers with."""

    status: int = 500
    code: str = "internal_error"
    type: str = "server_error"
    retry_after: int | None = None  # seconds; sent as the Retry-After header when set

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


class PermissionDenied(ServerError):
    """A valid key that may not do this (an inference key on an admin route)."""

    status, code, type = 403, "permission_denied", "permission_error"


class UnknownAdapter(ServerError):
    """The message names only the id asked for: never other adapters (they may be other tenants'),
    and a tenant's 404 for another tenant's adapter is this same answer. ``known`` (what the caller
    had, for in-process callers and logs) never reaches a client."""

    status, code, type = 404, "adapter_not_found", "not_found_error"

    def __init__(self, adapter_id: str, known: list[str] | None = None) -> None:
        super().__init__(f"adapter {adapter_id!r} does not exist", param="adapter_id")
        self.adapter_id = adapter_id
        self.known = known


class AdapterExists(ServerError):
    status, code, type = 409, "adapter_exists", "conflict_error"

    def __init__(self, adapter_id: str) -> None:
        super().__init__(
            f"adapter {adapter_id!r} already exists; delete it first or upload with replace=true",
            param="adapter_id",
        )
        self.adapter_id = adapter_id


class RequestTimeout(ServerError):
    """The request body did not arrive within the read timeout (slow or stalled client)."""

    status, code, type = 408, "request_timeout", "invalid_request_error"


class PayloadTooLarge(ServerError):
    status, code, type = 413, "payload_too_large", "invalid_request_error"


class HeadersTooLarge(ServerError):
    status, code, type = 431, "headers_too_large", "invalid_request_error"


class InvalidAdapter(ServerError):
    """The adapter files are malformed or describe something we refuse to serve (422)."""

    status, code, type = 422, "invalid_adapter", "invalid_request_error"


class AdapterIncompatible(InvalidAdapter):
    """A well-formed adapter that does not fit the loaded base model (shapes, modules, rank)."""

    code = "adapter_incompatible"


class AdapterTooLarge(InvalidAdapter):
    """The adapter needs more pages than the whole pool has."""

    code = "adapter_too_large"


class TooManyRequests(ServerError):
    """A tenant's limit on concurrent requests is reached; retry after ``retry_after`` seconds."""

    status, code, type = 429, "rate_limit_exceeded", "rate_limit_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class QuotaExceeded(ServerError):
    """A tenant's stored adapters or bytes would go over its quota. No Retry-After: waiting does
    not help, deleting adapters does."""

    status, code, type = 429, "quota_exceeded", "rate_limit_error"


class Overloaded(ServerError):
    status, code, type = 503, "overloaded", "server_error"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AdapterUnavailable(ServerError):
    """A stored adapter could not be loaded: its requests fail with this, every other request
    carries on. 503: a later try (after ``retry_after``), or another replica, may load it. The
    message names only the adapter (never a server path); the cause is in the server log."""

    status, code, type = 503, "adapter_unavailable", "server_error"
    default_reason = "could not be read from the adapter store; the cause is in the server log"

    def __init__(self, adapter_id: str, reason: str | None = None, retry_after: int = 5) -> None:
        self.reason = reason or self.default_reason
        super().__init__(f"adapter {adapter_id!r} {self.reason}", param="adapter_id")
        self.adapter_id = adapter_id
        self.retry_after = retry_after

    def for_id(self, adapter_id: str) -> AdapterUnavailable:
        """The same error naming the adapter as the caller named it (a tenant's plain name)."""
        return type(self)(adapter_id, self.reason, self.retry_after)


class AdapterCorrupt(AdapterUnavailable):
    """A stored file of the adapter no longer matches the sha256 recorded when it was stored (disk
    or copy corruption): it is refused rather than served wrong. Uploading the adapter again
    repairs the stored copy."""

    code = "adapter_corrupt"
    default_reason = ("failed its integrity check (a stored file does not match its sha256); upload it "
                      "again with replace=true")


class AdapterTooLargeHere(AdapterUnavailable):
    """A stored adapter (uploaded through a replica with larger limits) needs more host memory or
    pool pages than this server has: it can never load here, another replica may serve it."""

    code = "adapter_too_large"
