"""Upload scratch space shared by every process of a store: ``staging/<token>/``, each guarded by
``staging/<token>.lock``, which its writer holds an flock on for as long as the directory is in use.

Recovery must never remove another live process's upload (several replicas share the directory),
so an entry is *provably abandoned* only if (a) its lock file can be locked, which no living writer
allows (the kernel, or the NFS server's lease, drops the lock when the holder dies), and (b) it is
older than ``min_age``, which covers mounts where locks are not enforced (``nolock``) for any upload
shorter than that. A writer creates and locks the lock file before the directory, and checks that
the name still points at the file it locked, so a sweep racing with a new upload cannot win.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from adapter_store.fsio import remove_tree, try_lock, unique_token

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
DEFAULT_MIN_AGE = 600.0  # seconds; longer than any upload's staging and validation


class Staging:
    def __init__(self, directory: Path, min_age: float = DEFAULT_MIN_AGE) -> None:
        self.dir = directory
        self.min_age = min_age

    @contextlib.contextmanager
    def new(self) -> Iterator[Path]:
        """A fresh empty directory, locked for the ``with`` block and removed after it (unless the
        caller renamed it away, as a commit does)."""
        token, fd = self._lock_new_token()
        path = self.dir / token
        try:
            path.mkdir()
            yield path
        finally:
            remove_tree(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / f"{token}{LOCK_SUFFIX}")
            os.close(fd)

    def _lock_new_token(self) -> tuple[str, int]:
        while True:
            token = unique_token()
            lock_path = self.dir / f"{token}{LOCK_SUFFIX}"
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            if try_lock(fd) and _still_named(lock_path, fd):
                return token, fd
            os.close(fd)  # a sweep took it between create and lock: pick another name

    def sweep(self, now: float) -> list[str]:
        """Remove abandoned entries (see the module docstring); ``now`` is the file system's clock.
        Returns the tokens removed."""
        removed = []
        names = set(os.listdir(self.dir))
        for name in sorted(names):
            if name.endswith(LOCK_SUFFIX):
                token = name.removesuffix(LOCK_SUFFIX)
                if self._sweep_locked(token, now):
                    removed.append(token)
            elif f"{name}{LOCK_SUFFIX}" not in names and _age(self.dir / name, now) >= self.min_age:
                # A directory without its lock file: the writer creates the lock first and removes it
                # last, so only an interrupted sweep leaves this.
                remove_tree(self.dir / name)
                removed.append(name)
        for token in removed:
            log.info("removed abandoned upload staging %s", token)
        return removed

    def _sweep_locked(self, token: str, now: float) -> bool:
        lock_path = self.dir / f"{token}{LOCK_SUFFIX}"
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            young = os.fstat(fd).st_mtime > now - self.min_age
            if young or not try_lock(fd) or not _still_named(lock_path, fd):
                return False
            remove_tree(self.dir / token)
            os.unlink(lock_path)
            return True
        finally:
            os.close(fd)


def _still_named(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
