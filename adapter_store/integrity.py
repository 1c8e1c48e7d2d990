"""Checking a stored adapter version against its content address before it is served.

A version directory ``versions/<sha>/`` holds ``manifest.json`` (every file's sha256 and size) and
its name is the sha256 of that manifest, so the whole version is checkable from its name alone: the
manifest against the name, then each file against the manifest. Bit rot, a torn copy between
volumes, or a hand-edited file is caught here and the adapter is refused, never served with wrong
weights (which would be silent: corrupted weights still parse).

Hashing streams each file in 1 MiB chunks (no more memory than that), except the one file a loader
asks to keep (``read_version``): that one is read whole into one buffer, hashed, and handed to the
parser, so the bytes parsed are the bytes checked and are read from disk once. A buffer of 1 MiB or
more is a private anonymous mapping faulted in whole when made (``MAP_POPULATE``), not a
``bytearray``: a cold adapter's buffer is memory the server never used before (it stays in the host
cache). Faulted page by page, after a zero fill the kernel had already done, reading a 1.9 MB weights
file took the server 1.1-6.0 ms and a 3.7 MB one 2.2-13.4 ms; mapped whole, 0.7-1.5 and 1.3-2.2 ms
(9 cold loads of each size each way, SmolLM2 adapters, files in the page cache).

A file that is missing or not a regular file (a directory, a FIFO) is an I/O fault (``OSError``),
not corruption: the bytes were not there to check.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
from pathlib import Path

MANIFEST_NAME = "manifest.json"
CHUNK = 1 << 20
MAPPED_MIN = 1 << 20  # a kept file at least this long is read into a mapping faulted in at once


class IntegrityError(Exception):
    """A version's bytes differ from its content address. The message names the file and both
    digests, for the server log; clients get ``server.errors.AdapterCorrupt`` instead."""


def verify_version(path: Path) -> dict[str, str]:
    """Check the version directory ``path`` (named by its manifest's sha256) file by file.

    Returns ``{file name: sha256}`` of the files it checked. Raises IntegrityError on any mismatch,
    FileNotFoundError or another OSError if a file can't be read.
    """
    return read_version(path, None)[0]


def read_version(path: Path, keep: str | None,
                 max_keep: int = 1 << 62) -> tuple[dict[str, str], bytearray | memoryview | None]:
    """``verify_version``, also returning the bytes of file ``keep`` if the manifest lists it at no
    more than ``max_keep`` bytes (else None). Those are read once, whole, and hashed as read: the
    bytes returned are the bytes checked (a caller parsing them reads nothing twice)."""
    manifest = _read_regular(path / MANIFEST_NAME)
    digest = hashlib.sha256(manifest).hexdigest()
    if digest != path.name:
        raise IntegrityError(f"{path / MANIFEST_NAME}: sha256 {digest} does not match the version name")
    try:
        files = {str(name): (str(rec["sha256"]), int(rec["size"]))
                 for name, rec in json.loads(manifest)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # hash matched: written so
        raise IntegrityError(f"{path / MANIFEST_NAME}: malformed manifest ({exc})") from exc
    kept = None
    for name, (want, size) in sorted(files.items()):
        if name == keep and size <= max_keep:
            kept = _read_regular(path / name, size + 1, mapped=True)  # one byte more: a grown file is caught
            got_size, got = len(kept), hashlib.sha256(kept).hexdigest()
        else:
            got_size, got = hash_regular_file(path / name)
        if got_size != size or got != want:
            raise IntegrityError(f"{path / name}: {got_size} bytes with sha256 {got}; the manifest "
                                 f"says {size} bytes with sha256 {want}")
    return {name: sha for name, (sha, _) in files.items()}, kept


def is_intact(path: Path) -> bool:
    """Whether the version at ``path`` exists and verifies (a commit decides with this whether an
    existing copy of the same content must be replaced by the one just uploaded)."""
    try:
        verify_version(path)
    except (IntegrityError, OSError):
        return False
    return True


def hash_regular_file(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of the regular file ``path``, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        _check_regular(f.fileno(), path)
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _read_regular(path: Path, limit: int = -1, mapped: bool = False) -> bytearray | memoryview:
    """The file's bytes (at most ``limit`` of them), read into one writable buffer in place: with
    ``mapped``, a mapping (a memoryview of it) from MAPPED_MIN bytes, else a bytearray."""
    with open(path, "rb") as f:
        _check_regular(f.fileno(), path)
        size = os.fstat(f.fileno()).st_size
        want = size if limit < 0 else min(size, limit)
        buf = _buffer(want) if mapped else bytearray(want)
        got = f.readinto(buf)
        more = f.read(-1 if limit < 0 else limit - got) if got == want and (limit < 0 or got < limit) else b""
        if got == want and not more:
            return buf
        return bytearray(buf[:got]) + more  # the file shrank or grew since the stat: its bytes as read


def _buffer(n: int) -> bytearray | memoryview:
    """``n`` writable bytes: a private anonymous mapping faulted in whole at once from MAPPED_MIN
    bytes where the OS can (the mapping lives as long as the views of it), else a bytearray."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if n < MAPPED_MIN or not populate:
        return bytearray(n)
    return memoryview(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate))


def _check_regular(fd: int, path: Path) -> None:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise OSError(f"{path} is not a regular file")
