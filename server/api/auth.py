"""Bearer-key auth: every route but the probes resolves its caller to a ``Principal``.

Off unless keys are configured (``--api-key``, ``--admin-key``, ``--keys-file``): then every caller
is the anonymous global admin, as fits a server on loopback. With keys, a missing or unknown key is
401 and an inference key on an admin route is 403. The dependencies are ``async`` so that auth
never takes a thread-pool thread (sync dependencies run in one).
"""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.api.tenants import ANONYMOUS, Principal
from server.errors import PermissionDenied, Unauthorized

# auto_error=False: a missing header is our 401 in OpenAI's error shape, not FastAPI's 403.
bearer_scheme = HTTPBearer(auto_error=False, description="API key: 'Authorization: Bearer <key>'")


async def authenticate(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> Principal:
    keyring = request.app.state.keyring
    if not keyring.enabled:
        principal = ANONYMOUS
    elif credentials is None or not credentials.credentials:
        raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    else:
        found = keyring.lookup(credentials.credentials)
        if found is None:
            raise Unauthorized("invalid API key")
        principal = found
    request.state.principal = principal
    return principal


async def require_api_key(principal: Principal = Depends(authenticate)) -> Principal:
    """Any valid key: inference and reading adapters (confined to the key's tenant, if it has one)."""
    return principal


async def require_admin_key(principal: Principal = Depends(authenticate)) -> Principal:
    """An admin key: upload, replace and delete adapters (a tenant's admin: only its own)."""
    if not principal.is_admin:
        raise PermissionDenied("this key may not upload, replace or delete adapters: use an admin key")
    return principal
