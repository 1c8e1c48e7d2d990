"""What a put or a delete makes durable before it returns (and so before the API answers 2xx).

A kill -9 can't lose anything the kernel holds (tests/test_crash_store.py covers that); a power cut
or a host crash loses whatever was not fsynced. So this records every fsync and rename the store
makes and checks the rule that makes an acknowledged write survive a crash: each file is fsynced
before the rename that publishes it, and each directory whose entries a rename changed is fsynced
before the call returns; a ref is renamed only after the version it names is durable.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapter_store.store import AdapterStore


class SyscallLog:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, int, str]] = []  # (op, inode, path)
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd: int) -> None:
            real_fsync(fd)
            self.events.append(("fsync", os.fstat(fd).st_ino, os.readlink(f"/proc/self/fd/{fd}")))

        def rename(src, dst) -> None:
            real_rename(src, dst)
            self.events.append(("rename", os.stat(dst).st_ino, str(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)

    def index(self, op: str, ino: int, after: int = -1) -> int:
        """Position of the first ``op`` on inode ``ino`` after position ``after``; -1 if none."""
        return next((i for i, (o, n, _) in enumerate(self.events) if o == op and n == ino and i > after), -1)


def assert_published_durably(log: SyscallLog, path: Path) -> int:
    """``path`` was fsynced before the rename that gave it its name, and its directory after it.
    Returns the position of that directory fsync."""
    ino = path.stat().st_ino
    renamed = log.index("rename", ino)
    assert renamed >= 0, f"{path} was not published by a rename"
    if path.is_file():
        assert 0 <= log.index("fsync", ino) < renamed, f"{path} renamed before it was fsynced"
    dir_synced = log.index("fsync", path.parent.stat().st_ino, after=renamed)
    assert dir_synced > renamed, f"{path.parent} not fsynced after {path.name} was renamed into it"
    return dir_synced


def test_put_makes_files_version_and_ref_durable_in_order(tmp_path, monkeypatch, make_peft_adapter):
    source = make_peft_adapter("v1", r=4, target_modules=["q_proj"])[0]
    store = AdapterStore(tmp_path / "store")
    log = SyscallLog(monkeypatch)
    meta = store.put("a", source)
    version = store.version_path(meta.version)
    for f in version.iterdir():  # written in staging: fsynced there, the directory too
        assert log.index("fsync", f.stat().st_ino) >= 0, f"{f.name} never fsynced"
    staging_dir_synced = log.index("fsync", version.stat().st_ino)
    assert staging_dir_synced >= 0
    version_durable = assert_published_durably(log, version)
    assert staging_dir_synced < log.index("rename", version.stat().st_ino)
    ref = store.ref_path("a")
    assert_published_durably(log, ref)
    assert log.index("rename", ref.stat().st_ino) > version_durable  # never a ref to a lost version


def test_replace_and_delete_are_durable_before_returning(tmp_path, monkeypatch, make_peft_adapter):
    v1 = make_peft_adapter("v1", r=4, target_modules=["q_proj"])[0]
    v2 = make_peft_adapter("v2", seed=1, r=4, target_modules=["q_proj"])[0]
    store = AdapterStore(tmp_path / "store")
    store.put("a", v1)
    log = SyscallLog(monkeypatch)
    store.put("a", v2, replace=True)
    assert_published_durably(log, store.version_path(store.get_meta("a").version))
    assert_published_durably(log, store.ref_path("a"))
    log.events.clear()
    store.delete("a")
    assert_published_durably(log, store.ref_path("a"))
