"""The persistent disk tier, shareable by any number of server processes (a ReadWriteMany volume).

Layout under ``root``::

    versions/<sha256>/   immutable adapter versions: adapter_config.json, adapter_model.safetensors,
                         README.md?, manifest.json (each file's sha256 and size); the directory name
                         is the sha256 of the manifest, so equal content is stored once
    refs/<id>.json       per adapter: the version it names now and a generation, or a tombstone
    staging/             uploads being written (see adapter_store/staging.py)
    leases/              which versions each live process may still read (see adapter_store/gc.py)
    locks/, trash/       the commit lock; directories on their way out
    store.json           {"layout": 2}

An upload is staged, fsynced and validated in its own directory, then committed under one store-wide
lock (an flock, so it holds across hosts): the staging directory is renamed to ``versions/<sha>``
(unless that version exists), then the ref is replaced atomically (temp file, fsync, rename, fsync
dir). A delete replaces the ref with a tombstone. Nothing ever changes inside a version directory,
so a request bound to a version reads the same bytes however the id changes meanwhile. Versions no
ref names are removed later by ``gc.GarbageCollector``, never while a live process leases them.
Stores of the first layout (``root/<id>/meta.json``) are imported on open (adapter_store/legacy.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from adapter_store import legacy
from adapter_store.failpoints import failpoint
from adapter_store.fsio import (
    file_lock,
    fs_now,
    fsync_dir,
    replace_file,
    sha256_file,
    unique_token,
    write_file,
)
from adapter_store.integrity import MANIFEST_NAME, is_intact
from adapter_store.peft_format import CONFIG_NAME, TOKENIZER_FILES, WEIGHTS_NAME, check_adapter_files
from adapter_store.refs import (
    ADAPTER_ID_PATTERN,
    REF_SUFFIX,
    RefKey,
    StoredAdapterMeta,
    Tombstone,
    decode,
    encode,
    is_valid_adapter_id,
    validate_adapter_id,
)
from adapter_store.staging import DEFAULT_MIN_AGE, Staging
from adapter_store.tenancy import tenant_of
from server.errors import AdapterExists, InvalidAdapter, PayloadTooLarge, UnknownAdapter

__all__ = ["ADAPTER_ID_PATTERN", "AdapterStore", "StagedAdapter", "StoredAdapterMeta", "Tombstone",
           "validate_adapter_id"]

logger = logging.getLogger(__name__)

# anything else in an upload is ignored; an adapter's own tokenizer (added tokens) is kept with it
STORED_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md", *TOKENIZER_FILES)
LAYOUT_FILE, LAYOUT = "store.json", 2
SUBDIRS = ("versions", "refs", "staging", "leases", "locks", "trash")


@dataclass(frozen=True)
class StagedAdapter:
    """An upload written and fsynced in its staging directory, not yet visible."""

    adapter_id: str
    path: Path
    version: str
    checksum: str
    size_bytes: int


class AdapterStore:
    """Adapters on disk under ``root``; safe for concurrent use by threads and by processes."""

    def __init__(self, root: Path, max_adapter_bytes: int | None = None,
                 staging_min_age: float = DEFAULT_MIN_AGE) -> None:
        self.root = Path(root)
        self.max_adapter_bytes = max_adapter_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        # flock is per process on NFS: threads of this process serialize on this lock first.
        self._thread_lock = threading.Lock()
        self.staging = Staging(self.root / "staging", staging_min_age)
        with file_lock(self.root / ".open.lock"):  # one process at a time sets up or migrates
            legacy.set_aside_reserved(self.root, SUBDIRS + (LAYOUT_FILE,))
            for name in SUBDIRS:
                (self.root / name).mkdir(exist_ok=True)
            if not (self.root / LAYOUT_FILE).is_file():
                replace_file(self.root / LAYOUT_FILE, json.dumps({"layout": LAYOUT}).encode())
            self.staging.sweep(self.fs_now())
            legacy.import_legacy(self, staging_min_age)

    # ---- paths ----------------------------------------------------------------------------
    def ref_path(self, adapter_id: str) -> Path:
        return self.root / "refs" / f"{validate_adapter_id(adapter_id)}{REF_SUFFIX}"

    def version_path(self, version: str) -> Path:
        return self.root / "versions" / version

    def fs_now(self) -> float:
        return fs_now(self.root / "locks" / "clock")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The commit lock: ref writes and version creation or removal happen under it."""
        with self._thread_lock, file_lock(self.root / "locks" / "commit.lock"):
            yield

    # ---- writing --------------------------------------------------------------------------
    def put(self, adapter_id: str, source: Mapping[str, bytes] | Path, *, replace: bool = False,
            validate: Callable[[Path], None] | None = None,
            created_at: float | None = None) -> StoredAdapterMeta:
        """Store an adapter from a ``{file name: bytes}`` mapping or a PEFT directory.

        ``validate(staged_dir)`` runs on the staged copy before it becomes visible; whatever it
        raises propagates and nothing is stored. Raises AdapterExists if the id is taken and not
        ``replace``, PayloadTooLarge above ``max_adapter_bytes``, InvalidAdapter if files are missing.
        """
        with self.stage(adapter_id, source, replace=replace) as staged:
            if validate is not None:
                validate(staged.path)
            return self.commit(staged, replace=replace, created_at=created_at)[1]

    @contextlib.contextmanager
    def stage(self, adapter_id: str, source: Mapping[str, bytes] | Path,
              replace: bool = False) -> Iterator[StagedAdapter]:
        """Write an upload into a locked staging directory (removed after the block unless committed)."""
        validate_adapter_id(adapter_id)
        if not replace and self.exists(adapter_id):
            raise AdapterExists(adapter_id)  # early, before copying anything; commit checks again
        with self.staging.new() as path:
            yield self._write_staged(adapter_id, source, path)

    def commit(self, staged: StagedAdapter, replace: bool = False,
               created_at: float | None = None) -> tuple[RefKey, StoredAdapterMeta]:
        """Make a staged upload the id's current version: version dir, then the ref, atomically."""
        ref = self.ref_path(staged.adapter_id)
        with self.locked():
            failpoint("commit.locked")
            old = self._read_record(ref)
            if isinstance(old, StoredAdapterMeta) and not replace:
                raise AdapterExists(staged.adapter_id)
            self._place_version(staged)
            meta = StoredAdapterMeta(staged.adapter_id, staged.checksum, staged.size_bytes,
                                     created_at or time.time(), staged.version, _next_generation(old),
                                     tenant_of(staged.adapter_id))
            replace_file(ref, encode(meta), point="ref")
            key = RefKey.of(os.stat(ref))
        failpoint("commit.done")
        logger.info("stored adapter %s (version %s, generation %d)", staged.adapter_id, staged.version[:12],
                    meta.generation, extra={"adapter_id": staged.adapter_id, "checksum": staged.checksum})
        return key, meta

    def _place_version(self, staged: StagedAdapter) -> None:
        """Rename the staged directory to its version's name (under the commit lock), durably.

        The same content stored before is normally kept as it is. If that copy no longer verifies
        (corrupted on disk), the upload of good bytes repairs it: the broken copy goes to trash and
        the staged one takes its name, so every id naming this version serves again."""
        target = self.version_path(staged.version)
        if target.is_dir():
            if is_intact(target):
                return
            logger.warning("version %s is corrupted on disk; replaced by the copy just uploaded",
                           staged.version[:12], extra={"adapter_id": staged.adapter_id})
            os.rename(target, self.root / "trash" / f"{staged.version}-{unique_token()}")
        failpoint("commit.before_version_rename")
        os.rename(staged.path, target)
        failpoint("commit.version_renamed")
        fsync_dir(target.parent)

    def delete(self, adapter_id: str) -> tuple[RefKey, Tombstone]:
        """Tombstone an adapter; UnknownAdapter if it is not live. Its version stays until collected."""
        ref = self.ref_path(adapter_id)
        with self.locked():
            failpoint("delete.locked")
            old = self._read_record(ref)
            if not isinstance(old, StoredAdapterMeta):
                raise UnknownAdapter(adapter_id)
            tomb = Tombstone(adapter_id, old.generation + 1, time.time())
            replace_file(ref, encode(tomb), point="ref")
            key = RefKey.of(os.stat(ref))
        logger.info("deleted adapter %s (generation %d)", adapter_id, tomb.generation,
                    extra={"adapter_id": adapter_id})
        return key, tomb

    def _write_staged(self, adapter_id: str, source: Mapping[str, bytes] | Path,
                      staging: Path) -> StagedAdapter:
        """Copy the adapter files into ``staging`` with a manifest, all fsynced."""
        names, sizes = _source_files(source)
        check_adapter_files(names)
        size = sum(sizes.values())
        if self.max_adapter_bytes is not None and size > self.max_adapter_bytes:
            raise PayloadTooLarge(
                f"adapter files total {size} bytes, above the limit of {self.max_adapter_bytes}"
            )
        ignored = sorted(names - set(STORED_FILES) - {MANIFEST_NAME, legacy.META_NAME})
        if ignored:
            logger.info("adapter %s: ignoring files %s", adapter_id, ignored,
                        extra={"adapter_id": adapter_id})
        files = {}
        for name in sorted(sizes):
            data = source[name] if isinstance(source, Mapping) else Path(source) / name
            write_file(staging / name, data)
            files[name] = {"sha256": sha256_file(staging / name), "size": sizes[name]}
        failpoint("stage.files_written")
        manifest = json.dumps({"files": files}, sort_keys=True).encode()
        write_file(staging / MANIFEST_NAME, manifest)
        fsync_dir(staging)
        failpoint("stage.done")
        return StagedAdapter(adapter_id, staging, hashlib.sha256(manifest).hexdigest(),
                             files[WEIGHTS_NAME]["sha256"], size)

    # ---- reading --------------------------------------------------------------------------
    def key(self, adapter_id: str) -> RefKey | None:
        """The ref file's change stamp (one stat), None if the id was never stored."""
        try:
            return RefKey.of(os.stat(self.ref_path(adapter_id)))
        except FileNotFoundError:
            return None

    def read(self, adapter_id: str) -> tuple[RefKey, StoredAdapterMeta | Tombstone] | None:
        """The id's ref and the stamp of exactly the file read; None if never stored."""
        try:
            with open(self.ref_path(adapter_id), "rb") as f:
                key = RefKey.of(os.fstat(f.fileno()))
                return key, decode(f.read())
        except FileNotFoundError:
            return None

    def refs_key(self) -> RefKey:
        """The refs directory's change stamp (one stat): creating, replacing (a rename into it) or
        removing a ref changes it."""
        return RefKey.of(os.stat(self.root / "refs"))

    def scan(self) -> dict[str, RefKey]:
        """Every ref (live or tombstone) and its stamp: one directory listing plus a stat each."""
        out = {}
        with os.scandir(self.root / "refs") as entries:
            for entry in entries:
                adapter_id = entry.name.removesuffix(REF_SUFFIX)
                if entry.name.endswith(REF_SUFFIX) and is_valid_adapter_id(adapter_id):
                    with contextlib.suppress(FileNotFoundError):
                        out[adapter_id] = RefKey.of(entry.stat())
        return out

    def list(self) -> list[StoredAdapterMeta]:
        """All live adapters, sorted by id. Unreadable refs are logged and skipped."""
        out = []
        for adapter_id in sorted(self.scan()):
            try:
                found = self.read(adapter_id)
            except (OSError, ValueError) as exc:
                logger.warning("skipping adapter %s: unreadable ref (%s)", adapter_id, exc)
                continue
            if found is not None and isinstance(found[1], StoredAdapterMeta):
                out.append(found[1])
        return out

    def referenced_versions(self) -> set[str]:
        return {m.version for m in self.list()}

    def exists(self, adapter_id: str) -> bool:
        return isinstance(self._read_record(self.ref_path(adapter_id)), StoredAdapterMeta)

    def get_meta(self, adapter_id: str) -> StoredAdapterMeta:
        found = self.read(adapter_id)
        if found is None or not isinstance(found[1], StoredAdapterMeta):
            raise UnknownAdapter(adapter_id)
        return found[1]

    def get_path(self, adapter_id: str) -> Path:
        """The current version's directory (a PEFT dir); UnknownAdapter if absent."""
        return self.version_path(self.get_meta(adapter_id).version)

    def verify(self, adapter_id: str) -> bool:
        """True iff the weights file still has the sha256 recorded when it was stored."""
        meta = self.get_meta(adapter_id)
        return sha256_file(self.version_path(meta.version) / WEIGHTS_NAME) == meta.checksum

    def _read_record(self, ref: Path) -> StoredAdapterMeta | Tombstone | None:
        try:
            return decode(ref.read_bytes())
        except FileNotFoundError:
            return None


def _next_generation(old: StoredAdapterMeta | Tombstone | None) -> int:
    return 1 if old is None else old.generation + 1


def _source_files(source: Mapping[str, bytes] | Path) -> tuple[set[str], dict[str, int]]:
    if isinstance(source, Mapping):
        names = set(source)
        return names, {n: len(source[n]) for n in STORED_FILES if n in names}
    source = Path(source)
    if not source.is_dir():
        raise InvalidAdapter(f"adapter source {str(source)!r} is not a directory")
    names = {p.name for p in source.iterdir() if p.is_file()}
    return names, {n: (source / n).stat().st_size for n in STORED_FILES if n in names}
