"""Optional bearer-key auth: an inference key and a separate admin key for adapter upload/delete.

Both are off unless configured (fine on loopback; set them for any deployment). With only the
inference key set, admin routes require that key: uploading weights is never more open than
generating text. Keys are compared in constant time.
"""

from __future__ import annotations

import secrets

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from server.errors import Unauthorized

# auto_error=False: a missing header is our 401 in OpenAI's error shape, not FastAPI's 403.
bearer_scheme = HTTPBearer(auto_error=False, description="API key: 'Authorization: Bearer <key>'")


def _check(expected: SecretStr | None, credentials: HTTPAuthorizationCredentials | None, what: str) -> None:
    if expected is None:
        return
    if credentials is None or not credentials.credentials:
        raise Unauthorized(f"missing {what}: send the header 'Authorization: Bearer <key>'")
    if not secrets.compare_digest(credentials.credentials.encode(), expected.get_secret_value().encode()):
        raise Unauthorized(f"invalid {what}")


def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> None:
    _check(request.app.state.settings.api_key, credentials, "API key")


def require_admin_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> None:
    settings = request.app.state.settings
    if settings.admin_key is not None:
        _check(settings.admin_key, credentials, "admin key")
    else:
        _check(settings.api_key, credentials, "API key")
