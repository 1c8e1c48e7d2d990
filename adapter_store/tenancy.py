"""Adapter ids with an owner: ``tenant:name`` for a tenant's adapter, ``name`` for one with none.

Tenants have separate namespaces: two tenants may both upload ``support-bot`` and get two
adapters (``acme:support-bot`` and ``globex:support-bot``). Were names global, a tenant uploading
a name another tenant holds would learn that it exists (409), which is exactly what tenancy must
not reveal. The separator ``:`` is not allowed in adapter names, so a qualified id never equals
an unqualified one, and both are safe as one path component (no ``/``, no ``..``, no leading dot).

This is the whole of the store's knowledge of tenants: the qualified id is the store's key, and
``tenant_of`` recovers the owner (the store also records it in each adapter's metadata). Pure.
"""

from __future__ import annotations

import re

ADAPTER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
SEPARATOR = ":"
_NAME_RE = re.compile(ADAPTER_ID_PATTERN)
_TENANT_RE = re.compile(TENANT_PATTERN)


def is_valid_name(name: object) -> bool:
    """An adapter name as clients write it (no tenant part)."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None and ".." not in name


def is_valid_tenant(tenant: object) -> bool:
    return isinstance(tenant, str) and _TENANT_RE.fullmatch(tenant) is not None


def qualify(tenant: str | None, name: str) -> str:
    """The stored id of ``name`` owned by ``tenant`` (None: no owner)."""
    return name if tenant is None else f"{tenant}{SEPARATOR}{name}"


def split(adapter_id: str) -> tuple[str | None, str]:
    """``"acme:x"`` -> ``("acme", "x")``; ``"x"`` -> ``(None, "x")``."""
    tenant, sep, name = adapter_id.partition(SEPARATOR)
    return (tenant, name) if sep else (None, adapter_id)


def tenant_of(adapter_id: str) -> str | None:
    return split(adapter_id)[0]


def is_valid_stored_id(adapter_id: object) -> bool:
    """A stored id: a valid name, optionally qualified by a valid tenant."""
    if not isinstance(adapter_id, str):
        return False
    tenant, name = split(adapter_id)
    return is_valid_name(name) and (tenant is None or is_valid_tenant(tenant))
