"""Who is calling: API keys, the tenant and role each belongs to, and each tenant's limits.

Keys come from an optional keys file (``--keys-file``, JSON) and from ``--api-key`` /
``--admin-key``::

    {
      "admin_keys": ["sk-root"],                   # global admins: everything, every tenant
      "inference_keys": ["sk-ops"],                # global inference: every adapter
      "default_limits": {"max_concurrent_requests": 16},
      "tenants": {
        "acme": {
          "inference_keys": ["sk-acme-app", "sha256:9f86d081884c7d65..."],
          "admin_keys": ["sk-acme-admin"],
          "limits": {"max_adapters": 50, "max_adapter_bytes": "2GiB", "max_concurrent_requests": 8}
        }
      }
    }

A key is the secret itself or ``sha256:<hex digest of it>``, so the file need not hold secrets.
A tenant's keys reach only the base model and that tenant's adapters (its names live in their own
namespace: adapter_store/tenancy.py); its admin keys may also upload, replace and delete them.
Every lookup hashes the presented key and compares it with every known digest in constant time,
without stopping at a match, so timing reveals neither a key nor which entry matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator

from adapter_store.tenancy import (
    ADAPTER_ID_PATTERN,
    TENANT_PATTERN,
    is_valid_name,
    is_valid_stored_id,
    is_valid_tenant,
    qualify,
    split,
    tenant_of,
)
from server.errors import InvalidRequest

Role = Literal["inference", "admin"]
NO_TENANT = "-"  # the metrics label of requests and adapters that belong to no tenant
_DIGEST_PREFIX = "sha256:"


class KeysFileError(ValueError):
    """The keys file is unreadable or invalid; the message says where."""


class _Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_adapters: int | None = Field(None, ge=0)
    max_adapter_bytes: ByteSize | None = Field(None, ge=0)
    max_concurrent_requests: int | None = Field(None, ge=1)


class _Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inference_keys: list[str] = []
    admin_keys: list[str] = []
    limits: _Limits = _Limits()


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    admin_keys: list[str] = []
    inference_keys: list[str] = []
    default_limits: _Limits = _Limits()
    tenants: dict[str, _Tenant] = {}

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, tenants: dict[str, _Tenant]) -> dict[str, _Tenant]:
        for name in tenants:
            if not is_valid_tenant(name):
                raise ValueError(f"tenant name {name!r} must match {TENANT_PATTERN}")
        return tenants


@dataclass(frozen=True)
class TenantLimits:
    """None = unlimited."""

    max_adapters: int | None = None
    max_adapter_bytes: int | None = None
    max_concurrent_requests: int | None = None

    @classmethod
    def merged(cls, own: _Limits, default: _Limits) -> TenantLimits:
        def pick(name: str) -> int | None:
            value = getattr(own, name)
            value = getattr(default, name) if value is None else value
            return None if value is None else int(value)

        return cls(pick("max_adapters"), pick("max_adapter_bytes"), pick("max_concurrent_requests"))


@dataclass(frozen=True)
class Principal:
    """The caller. ``tenant`` None: not confined to a tenant (global keys, or no keys at all)."""

    role: Role
    tenant: str | None
    limits: TenantLimits = field(default_factory=TenantLimits)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def label(self) -> str:
        return self.tenant or NO_TENANT

    def qualify(self, name: str) -> str | None:
        """The stored id that ``name``, as this caller wrote it, refers to; None if it can refer to
        nothing this caller may see (answered exactly like a missing adapter)."""
        if self.tenant is None:
            return name if is_valid_stored_id(name) else None
        return qualify(self.tenant, name) if is_valid_name(name) else None

    def stored_id(self, name: str) -> str:
        """``qualify``, raising a 400 naming ``adapter_id`` if ``name`` can't be an id at all."""
        stored = self.qualify(name)
        if stored is None:
            raise InvalidRequest(f"invalid adapter_id {name!r}: must match {ADAPTER_ID_PATTERN} and not "
                                 "contain '..'", param="adapter_id")
        return stored

    def sees(self, stored_id: str) -> bool:
        return self.tenant is None or tenant_of(stored_id) == self.tenant

    def display(self, stored_id: str) -> str:
        """The id this caller uses for a stored adapter: a tenant's own names are unqualified."""
        return stored_id if self.tenant is None else split(stored_id)[1]


ANONYMOUS = Principal("admin", None)  # no keys configured: the server is open (loopback use)


def _digest(key: str) -> bytes:
    if key.startswith(_DIGEST_PREFIX):
        hexdigest = key[len(_DIGEST_PREFIX):]
        try:
            raw = bytes.fromhex(hexdigest)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise KeysFileError(f"{key[:16]}...: a '{_DIGEST_PREFIX}' key needs 64 hex digits")
        return raw
    if not key:
        raise KeysFileError("an empty key is not allowed")
    return hashlib.sha256(key.encode()).digest()


class Keyring:
    """Every known key as (sha256 digest, principal)."""

    def __init__(self, entries: list[tuple[str, Principal]]) -> None:
        self._entries: list[tuple[bytes, Principal]] = []
        seen: set[bytes] = set()
        for key, principal in entries:
            digest = _digest(key)
            if digest in seen:
                raise KeysFileError("the same key is listed twice (each key must have one owner and role)")
            seen.add(digest)
            self._entries.append((digest, principal))

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @property
    def tenants(self) -> list[str]:
        return sorted({p.tenant for _, p in self._entries if p.tenant is not None})

    def lookup(self, key: str) -> Principal | None:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, principal in self._entries:  # no early exit: every lookup costs the same
            if hmac.compare_digest(digest, known):
                found = principal
        return found

    @classmethod
    def from_settings(cls, settings: Any) -> Keyring:
        """From ``ServerSettings``: ``keys_file``, ``api_key`` and ``admin_key``."""
        def secret(value: Any) -> str | None:
            return None if value is None else value.get_secret_value()

        return cls.build(settings.keys_file, secret(settings.api_key), secret(settings.admin_key))

    @classmethod
    def build(cls, keys_file: Path | None, api_key: str | None, admin_key: str | None) -> Keyring:
        """Keys from the file plus the two single-key settings. ``api_key`` alone (no admin key, no
        file) may also manage adapters: uploading is never more open than generating."""
        entries: list[tuple[str, Principal]] = []
        if admin_key:
            entries.append((admin_key, Principal("admin", None)))
        if api_key:
            alone = admin_key is None and keys_file is None
            entries.append((api_key, Principal("admin" if alone else "inference", None)))
        if keys_file is not None:
            entries += _file_entries(_load(keys_file))
        return cls(entries)


def _load(path: Path) -> _KeysFile:
    try:
        data: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeysFileError(f"keys file {str(path)!r}: {exc}") from exc
    try:
        return _KeysFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise KeysFileError(f"keys file {str(path)!r}: {where}: {err['msg']}") from exc


def _file_entries(spec: _KeysFile) -> list[tuple[str, Principal]]:
    entries = [(k, Principal("admin", None)) for k in spec.admin_keys]
    entries += [(k, Principal("inference", None)) for k in spec.inference_keys]
    for tenant, t in sorted(spec.tenants.items()):
        limits = TenantLimits.merged(t.limits, spec.default_limits)
        entries += [(k, Principal("admin", tenant, limits)) for k in t.admin_keys]
        entries += [(k, Principal("inference", tenant, limits)) for k in t.inference_keys]
    return entries
