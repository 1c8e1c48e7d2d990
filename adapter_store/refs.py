"""Adapter ids and the per-adapter ref file: which immutable version an id names now, or a tombstone.

A ref is ``refs/<adapter_id>.json``, rewritten only by an atomic replace (``fsio.replace_file``), so
a reader sees a whole record. Every put or delete of an id bumps its ``generation``. ``RefKey`` is
what ``stat`` says about a ref file; because every rewrite is a rename of a new file, the key
changes with every rewrite, and a replica can tell whether anything changed without reading.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from adapter_store.tenancy import ADAPTER_ID_PATTERN, is_valid_stored_id, tenant_of
from server.errors import InvalidRequest

REF_SUFFIX = ".json"
FORMAT = 1


def is_valid_adapter_id(adapter_id: object) -> bool:
    """A stored id (``name`` or ``tenant:name``, adapter_store/tenancy.py): safe as a file name."""
    return is_valid_stored_id(adapter_id)


def validate_adapter_id(adapter_id: str) -> str:
    """Return ``adapter_id`` if it is safe as a file name, else raise InvalidRequest.

    A tenant's adapter is stored as ``tenant:name`` (adapter_store/tenancy.py)."""
    if not is_valid_adapter_id(adapter_id):
        raise InvalidRequest(
            f"invalid adapter id {adapter_id!r}: must match {ADAPTER_ID_PATTERN} and not contain '..'",
            param="adapter_id",
        )
    return adapter_id


@dataclass(frozen=True)
class StoredAdapterMeta:
    """A live ref: what is stored under an id now."""

    adapter_id: str
    checksum: str  # sha256 hex of adapter_model.safetensors
    size_bytes: int  # all stored adapter files
    created_at: float  # unix time of the put that wrote this version
    version: str = ""  # sha256 naming the immutable directory versions/<version>
    generation: int = 0  # 1 for the first put of an id, +1 for every later put or delete
    tenant: str | None = None  # the owner (the ``tenant:`` part of the id); None: no owner


@dataclass(frozen=True)
class Tombstone:
    """A deleted id. Kept (not unlinked) so the id's generations keep increasing across re-uploads."""

    adapter_id: str
    generation: int
    deleted_at: float


Record = StoredAdapterMeta | Tombstone


@dataclass(frozen=True)
class RefKey:
    """A ref file's identity and change stamp, from ``stat``; any rewrite changes it."""

    ino: int
    mtime_ns: int
    ctime_ns: int
    size: int

    @classmethod
    def of(cls, st: os.stat_result) -> RefKey:
        return cls(st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def encode(record: Record) -> bytes:
    return json.dumps({"format": FORMAT, **asdict(record)}, indent=1).encode()


def decode(data: bytes) -> Record:
    """Parse a ref file; ValueError if it is not one."""
    try:
        d = json.loads(data)
        if d.get("format") != FORMAT:
            raise ValueError(f"unknown ref format {d.get('format')!r}")
        if "deleted_at" in d:
            return Tombstone(str(d["adapter_id"]), int(d["generation"]), float(d["deleted_at"]))
        adapter_id = str(d["adapter_id"])
        return StoredAdapterMeta(
            adapter_id=adapter_id, checksum=str(d["checksum"]), size_bytes=int(d["size_bytes"]),
            created_at=float(d["created_at"]), version=str(d["version"]), generation=int(d["generation"]),
            tenant=tenant_of(adapter_id),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed ref: {exc}") from exc
