"""The one place where errors become HTTP responses, in OpenAI's shape.

Body: ``{"error": {"message", "type", "param", "code"}}``. ``ServerError`` subclasses carry their
status; request validation errors are 400 with the offending field in ``param`` (422 is reserved
for adapters that don't fit the base model); 503 carries ``Retry-After``. Anything unexpected is
logged with its traceback and answered 500 without internals, and never stops the server.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import (
    HeadersTooLarge,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServerError,
)

logger = logging.getLogger(__name__)
UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}  # pydantic's names of union members
BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's words when json.loads fails oddly


class ClientDisconnected(ServerError):
    """The client went away before the answer was complete (nginx's 499); never sent, only counted."""

    status, code, type = 499, "client_closed_request", "invalid_request_error"


def error_body(message: str, type_: str, code: str | int | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def server_error_body(exc: ServerError) -> dict[str, Any]:
    return error_body(exc.message, exc.type, exc.code, exc.param)


def _validation_param(loc: tuple[Any, ...]) -> str:
    """``("body", "messages", 0, "role")`` -> ``"messages.0.role"``; pydantic's union tags dropped."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Union members show up as type names (``prompt.str``, ``prompt.list[int].0``); keep the user's path.
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in UNION_TAGS]
    return ".".join(parts) if parts else "body"


def validation_error(exc: RequestValidationError) -> ServerError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _validation_param(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":  # loc is ("body", character position)
        param = "body"
        reason = (first.get("ctx") or {}).get("error") or first.get("msg")
        message = f"request body is not valid JSON: {reason} at character {first['loc'][-1]}"
    elif param == "body":
        message = f"invalid request body: {first.get('msg')}"
    else:
        message = f"invalid value for '{param}': {first.get('msg')}"
    others = len({_validation_param(tuple(e.get("loc", ()))) for e in errors} - {param})
    if others:
        message += f" (and {others} other field(s))"
    return InvalidRequest(message, param=param)


CLOSE_AFTER = (RequestTimeout, PayloadTooLarge, HeadersTooLarge)  # the rest of the request is unread


def to_response(exc: ServerError) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(exc.retry_after)))
    if isinstance(exc, CLOSE_AFTER):
        headers["Connection"] = "close"
    return JSONResponse(server_error_body(exc), status_code=exc.status, headers=headers)


def body_parse_error(cause: BaseException | None) -> ServerError:
    """FastAPI's "There was an error parsing the body", with its cause spelled out."""
    if isinstance(cause, RecursionError):
        return InvalidRequest("request body nests too deeply (a JSON bomb?): the server refuses JSON "
                              "nested more than a few hundred levels", param="body")
    if isinstance(cause, UnicodeDecodeError):
        return InvalidRequest(f"request body is not valid UTF-8: byte {cause.start} is invalid", param="body")
    reason = f": {cause}" if cause is not None else ""
    return InvalidRequest(f"request body could not be parsed as JSON{reason}", param="body")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers. ``app.state.on_request_error(request, status)``, if set, is told of
    every failed request so the metrics count it."""

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        _note(request, exc.status)
        log = logger.warning if exc.status >= 500 else logger.info
        log("request failed: %s", exc.message, extra=_log_fields(request, exc.status))
        return to_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        _note(request, err.status)
        logger.info("invalid request: %s", err.message, extra=_log_fields(request, err.status))
        return to_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:
            return await _server_error(request, body_parse_error(exc.__cause__))
        code = "not_found" if exc.status_code == 404 else exc.status_code
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, type_, code, None), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _note(request, 500)
        logger.exception("unhandled error", extra=_log_fields(request, 500))
        body = error_body("internal server error; the details are in the server log", "server_error",
                          "internal_error", None)
        return JSONResponse(body, status_code=500)


def _note(request: Request, status: int) -> None:
    """Tell the metrics (if the route registered itself) how this request ended."""
    hook = getattr(request.app.state, "on_request_error", None)
    if hook is not None:
        hook(request, status)


def _log_fields(request: Request, status: int) -> dict[str, Any]:
    return {
        "request_id": getattr(request.state, "request_id", "-"),
        "adapter_id": getattr(request.state, "adapter_id", None) or "-",
        "status": status,
        "path": request.url.path,
    }
