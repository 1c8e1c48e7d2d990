"""File-system primitives of the shared adapter store: durable writes, atomic replaces, file locks.

Everything here must hold on a network file system shared by several hosts (an NFS or CephFS
ReadWriteMany volume), so it uses only what those honour: ``rename`` within a directory is atomic,
``fsync`` of a file and of its directory makes a rename durable, and ``flock`` locks are seen by
every client (Linux's NFS client implements them as whole-file POSIX locks, so two threads of one
process do not exclude each other there: callers pair a file lock with a ``threading.Lock``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from adapter_store.failpoints import failpoint

CHUNK = 1 << 20


def unique_token() -> str:
    """A name no other process on any host sharing the store will pick: host, pid and randomness."""
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(dest: Path, data: bytes | Path) -> None:
    """Create ``dest`` (it must not exist) with ``data`` (bytes, or a file to copy), fsynced."""
    with open(dest, "xb") as out:
        if isinstance(data, Path):
            with open(data, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
        else:
            out.write(data)
        out.flush()
        os.fsync(out.fileno())


def replace_file(dest: Path, data: bytes, durable: bool = True, point: str = "") -> None:
    """Atomically make ``dest`` hold ``data``: write a unique temp file next to it, fsync, rename over
    ``dest``, fsync the directory. Readers see the old or the new content, never a mix; a crash
    leaves at most a ``.tmp-*`` file, which the garbage collector clears. ``point`` names the
    failpoints ``<point>.tmp_written`` and ``<point>.renamed`` (adapter_store/failpoints.py)."""
    tmp = dest.with_name(f".tmp-{dest.name}-{unique_token()}")
    try:
        with open(tmp, "xb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        if point:
            failpoint(f"{point}.tmp_written")
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if point:
        failpoint(f"{point}.renamed")
    if durable:
        fsync_dir(dest.parent)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[int]:
    """Hold an flock on ``path`` (created if missing) for the ``with`` block; blocks until granted."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def try_lock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False if another holder has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def remove_tree(path: Path) -> None:
    """Delete a file or directory tree; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fs_now(probe: Path) -> float:
    """The file system's clock: touch ``probe`` and read its mtime. Ages of files written by other
    hosts (leases, staging) are measured against this, so clock skew between hosts doesn't matter."""
    probe.touch()
    os.utime(probe, None)
    return probe.stat().st_mtime
