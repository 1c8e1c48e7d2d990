"""Leases and garbage collection of adapter versions in a store shared by several processes.

A version directory no ref names any more (replaced or deleted) may still be read by a request
admitted before the change, in this process or in another replica (its weights are read from disk
again whenever the host cache dropped them). So a version is removed only if all of these hold:

1. no live ref names it (checked under the commit lock, which puts also hold while they create a
   version and write its ref, so a version can't become referenced while it is being removed);
2. no live lease lists it: every process keeps ``leases/<token>.json`` listing every version its
   registry holds (current ones and replaced ones with requests still in flight), rewritten when
   that set changes and at least every ``LEASE_REFRESH`` seconds; a lease not rewritten for
   ``LEASE_TTL`` seconds (file system clock) belongs to a dead process and is ignored;
3. this collector has seen it unreferenced and unleased on every pass for ``grace`` seconds. This
   covers the moment between a replica reading a ref and its next lease write (well under a
   second): a version it just read was referenced at that moment, so the clock had not started.

A process stalled for longer than ``LEASE_TTL`` can lose a replaced version it still needed; its
request then fails to load the adapter (an error, never another version's output).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from adapter_store.fsio import remove_tree, replace_file, unique_token
from adapter_store.store import AdapterStore

log = logging.getLogger(__name__)

LEASE_TTL = 60.0
LEASE_REFRESH = 10.0
VERSION_GRACE = 60.0
STALE_LEASE = 10 * LEASE_TTL  # a dead process's lease file is removed after this long


class Lease:
    """This process's lease on the versions it may still read."""

    def __init__(self, store: AdapterStore, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = store.root / "leases" / f"{unique_token()}.json"
        self._clock = clock
        self._versions: frozenset[str] | None = None
        self._written = 0.0

    def renew(self, versions: set[str]) -> bool:
        """Rewrite the lease if ``versions`` changed or it is due; True if written."""
        now = self._clock()
        if versions == self._versions and now - self._written < LEASE_REFRESH:
            return False
        body = {"pid": os.getpid(), "versions": sorted(versions)}
        # Not fsynced: after a crash of this host the lease's owner is gone too.
        replace_file(self.path, json.dumps(body).encode(), durable=False)
        self._versions, self._written = frozenset(versions), now
        return True

    def release(self) -> None:
        remove_tree(self.path)


def leased_versions(leases_dir: Path, now: float, ttl: float = LEASE_TTL) -> set[str]:
    """Versions listed by leases rewritten within ``ttl`` seconds of ``now`` (file system clock)."""
    out: set[str] = set()
    for path in leases_dir.glob("*.json"):
        try:
            if now - path.stat().st_mtime < ttl:
                out.update(json.loads(path.read_bytes())["versions"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # replaced or removed while we looked: the next pass sees the new one
    return out


class GarbageCollector:
    def __init__(self, store: AdapterStore, grace: float = VERSION_GRACE, lease_ttl: float = LEASE_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.grace = grace
        self.lease_ttl = lease_ttl
        self._clock = clock
        self._unreferenced_since: dict[str, float] = {}

    def collect(self) -> list[str]:
        """One pass: remove the versions that qualify (module docstring) and other leftovers.
        Returns the versions removed."""
        store = self.store
        fs_now = store.fs_now()
        with store.locked():
            on_disk = {p.name for p in (store.root / "versions").iterdir() if not p.name.startswith(".")}
            leased = leased_versions(store.root / "leases", fs_now, self.lease_ttl)
            keep = store.referenced_versions() | leased
            now = self._clock()
            self._unreferenced_since = {v: self._unreferenced_since.get(v, now) for v in on_disk - keep}
            doomed = sorted(v for v, since in self._unreferenced_since.items() if now - since >= self.grace)
            for version in doomed:
                # Renamed away under the lock (atomic), deleted after it: a half-deleted directory is
                # never visible under a version's name.
                os.rename(store.version_path(version), store.root / "trash" / f"{version}-{unique_token()}")
                del self._unreferenced_since[version]
        for version in doomed:
            log.info("removed adapter version %s: no ref or live lease names it", version[:12])
        self._sweep(fs_now)
        return doomed

    def _sweep(self, fs_now: float) -> None:
        root = self.store.root
        for path in (root / "trash").iterdir():
            remove_tree(path)
        for path in (root / "leases").glob("*.json"):
            _remove_if_older(path, fs_now, STALE_LEASE)
        for directory in (root / "refs", root / "leases"):
            for path in directory.glob(".tmp-*"):  # a writer that crashed between write and rename
                _remove_if_older(path, fs_now, self.store.staging.min_age)
        self.store.staging.sweep(fs_now)


def _remove_if_older(path: Path, now: float, age: float) -> None:
    try:
        if now - path.stat().st_mtime >= age:
            remove_tree(path)
    except FileNotFoundError:
        pass
