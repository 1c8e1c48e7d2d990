"""The persistent disk tier: one PEFT directory per adapter under a root directory.

Layout: ``root/<adapter_id>/{adapter_config.json, adapter_model.safetensors, README.md?, meta.json}``.
An adapter is visible iff ``root/<adapter_id>/meta.json`` exists.

Crash safety: uploads are written and fsynced into ``root/.staging-<uuid>``, validated there, and
only then renamed into place (a directory rename is atomic on POSIX). Replacing renames the old dir
to ``root/.old-<uuid>`` first; deleting renames it to ``root/.deleted-<uuid>``. Ids cannot start
with a dot, so none of these can collide with an adapter. On start-up staging and deleted dirs are
removed, and an ``.old-`` dir whose adapter has no replacement (crash between the two renames of a
replace) is renamed back, so a crash never loses the previous version nor shows a partial one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from adapter_store.peft_format import CONFIG_NAME, WEIGHTS_NAME, check_adapter_files, sha256_file
from adapter_store.tenancy import ADAPTER_ID_PATTERN, is_valid_stored_id, tenant_of
from server.errors import AdapterExists, InvalidAdapter, InvalidRequest, PayloadTooLarge, UnknownAdapter

logger = logging.getLogger(__name__)

META_NAME = "meta.json"
STORED_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")  # anything else in an upload is ignored
_STAGING, _OLD, _DELETED = ".staging-", ".old-", ".deleted-"
_CHUNK = 1 << 20


def validate_adapter_id(adapter_id: str) -> str:
    """Return ``adapter_id`` if it is safe as a directory name, else raise InvalidRequest.

    A tenant's adapter is stored as ``tenant:name`` (adapter_store/tenancy.py)."""
    if not is_valid_stored_id(adapter_id):
        raise InvalidRequest(
            f"invalid adapter id {adapter_id!r}: must match {ADAPTER_ID_PATTERN} and not contain '..'",
            param="adapter_id",
        )
    return adapter_id


@dataclass(frozen=True)
class StoredAdapterMeta:
    """What ``meta.json`` records about a stored adapter."""

    adapter_id: str
    checksum: str  # sha256 hex of adapter_model.safetensors
    size_bytes: int  # all stored adapter files, meta.json excluded
    created_at: float  # unix time of the put that wrote this version
    tenant: str | None = None  # the owner (the ``tenant:`` part of the id); None: no owner


class AdapterStore:
    """Adapters on disk under ``root``; safe for concurrent use from several threads."""

    def __init__(self, root: Path, max_adapter_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_adapter_bytes = max_adapter_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        # Serializes the rename steps of put/delete so check-then-rename sequences don't interleave.
        self._lock = threading.Lock()
        self._recover()

    def put(
        self,
        adapter_id: str,
        source: Mapping[str, bytes] | Path,
        *,
        replace: bool = False,
        validate: Callable[[Path], None] | None = None,
    ) -> StoredAdapterMeta:
        """Store an adapter from a ``{file name: bytes}`` mapping or a PEFT directory.

        ``validate(staged_dir)`` runs on the staged copy before it becomes visible; whatever it
        raises propagates and nothing is stored. Raises AdapterExists if the id is taken and not
        ``replace``, PayloadTooLarge above ``max_adapter_bytes``, InvalidAdapter if files are missing.
        """
        validate_adapter_id(adapter_id)
        if not replace and self.exists(adapter_id):
            raise AdapterExists(adapter_id)
        staging = self.root / f"{_STAGING}{uuid.uuid4().hex}"
        try:
            staging.mkdir()
            meta = self._stage(adapter_id, source, staging)
            if validate is not None:
                validate(staging)
            with self._lock:
                self._commit(adapter_id, staging, replace)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        logger.info("stored adapter %s", adapter_id,
                    extra={"adapter_id": adapter_id, "checksum": meta.checksum})
        return meta

    def exists(self, adapter_id: str) -> bool:
        return (self.root / validate_adapter_id(adapter_id) / META_NAME).is_file()

    def get_path(self, adapter_id: str) -> Path:
        """Directory of a stored adapter (a PEFT dir); UnknownAdapter if absent."""
        if not self.exists(adapter_id):
            raise UnknownAdapter(adapter_id)
        return self.root / adapter_id

    def get_meta(self, adapter_id: str) -> StoredAdapterMeta:
        return _read_meta(self.get_path(adapter_id) / META_NAME)

    def list(self) -> list[StoredAdapterMeta]:
        """All visible adapters, sorted by id. Unreadable entries are logged and skipped."""
        out = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(".") or not is_valid_stored_id(child.name):
                continue
            try:
                out.append(_read_meta(child / META_NAME))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("skipping %s: unreadable %s (%s)", child, META_NAME, exc)
        return out

    def delete(self, adapter_id: str) -> None:
        """Remove an adapter; UnknownAdapter if absent. Atomic: a rename, then cleanup."""
        with self._lock:
            path = self.get_path(adapter_id)
            trash = self.root / f"{_DELETED}{uuid.uuid4().hex}"
            os.rename(path, trash)
            _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted adapter %s", adapter_id, extra={"adapter_id": adapter_id})

    def verify(self, adapter_id: str) -> bool:
        """True iff the weights file still has the sha256 recorded when it was stored."""
        meta = self.get_meta(adapter_id)
        return sha256_file(self.root / adapter_id / WEIGHTS_NAME) == meta.checksum

    def _stage(self, adapter_id: str, source: Mapping[str, bytes] | Path, staging: Path) -> StoredAdapterMeta:
        """Write the adapter files and meta.json into ``staging``, fsynced."""
        if isinstance(source, Mapping):
            names = set(source)
            sizes = {n: len(source[n]) for n in STORED_FILES if n in names}
        else:
            source = Path(source)
            if not source.is_dir():
                raise InvalidAdapter(f"adapter source {str(source)!r} is not a directory")
            names = {p.name for p in source.iterdir() if p.is_file()}
            sizes = {n: (source / n).stat().st_size for n in STORED_FILES if n in names}
        check_adapter_files(names)
        size = sum(sizes.values())
        if self.max_adapter_bytes is not None and size > self.max_adapter_bytes:
            raise PayloadTooLarge(
                f"adapter files total {size} bytes, above the limit of {self.max_adapter_bytes}"
            )
        ignored = sorted(names - set(STORED_FILES) - {META_NAME})
        if ignored:
            logger.info("adapter %s: ignoring files %s", adapter_id, ignored,
                        extra={"adapter_id": adapter_id})
        for name in sizes:
            data = source[name] if isinstance(source, Mapping) else source / name
            _write_file(staging / name, data)
        meta = StoredAdapterMeta(adapter_id, sha256_file(staging / WEIGHTS_NAME), size, time.time(),
                                 tenant_of(adapter_id))
        _write_file(staging / META_NAME, json.dumps(asdict(meta), indent=2).encode())
        _fsync_dir(staging)
        return meta

    def _commit(self, adapter_id: str, staging: Path, replace: bool) -> None:
        final = self.root / adapter_id
        old = None
        if final.exists():
            if (final / META_NAME).is_file() and not replace:
                raise AdapterExists(adapter_id)
            old = self.root / f"{_OLD}{uuid.uuid4().hex}"
            os.rename(final, old)
        try:
            os.rename(staging, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
            raise
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _recover(self) -> None:
        """Undo what an interrupted put/delete left behind (see the module docstring)."""
        for child in self.root.iterdir():
            name = child.name
            if name.startswith(_OLD):
                self._restore_old(child)
            elif name.startswith((_STAGING, _DELETED)):
                logger.info("removing leftover %s", child)
                shutil.rmtree(child, ignore_errors=True)

    def _restore_old(self, old: Path) -> None:
        try:
            adapter_id = validate_adapter_id(_read_meta(old / META_NAME).adapter_id)
        except (OSError, ValueError, KeyError, TypeError, InvalidRequest):
            adapter_id = None
        if adapter_id is not None and not (self.root / adapter_id).exists():
            logger.warning("restoring adapter %s after an interrupted replace", adapter_id)
            os.rename(old, self.root / adapter_id)
            _fsync_dir(self.root)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _read_meta(path: Path) -> StoredAdapterMeta:
    d = json.loads(path.read_text(encoding="utf-8"))
    return StoredAdapterMeta(
        adapter_id=str(d["adapter_id"]),
        checksum=str(d["checksum"]),
        size_bytes=int(d["size_bytes"]),
        created_at=float(d["created_at"]),
        tenant=d.get("tenant"),
    )


def _write_file(dest: Path, data: bytes | Path) -> None:
    with open(dest, "xb") as out:
        if isinstance(data, Path):
            with open(data, "rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)
        else:
            out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
