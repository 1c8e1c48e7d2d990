"""One store directory shared by several processes: uploads in flight survive another process's
start-up, concurrent writers keep generations and versions consistent, garbage collection never
removes a version a live process may read, and stores of the first layout are imported."""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from adapter_store.fsio import file_lock
from adapter_store.gc import LEASE_TTL, STALE_LEASE, GarbageCollector, Lease
from adapter_store.peft_format import WEIGHTS_NAME
from adapter_store.refs import StoredAdapterMeta, decode
from adapter_store.store import AdapterStore
from server.errors import AdapterExists, UnknownAdapter


@pytest.fixture
def v1(make_peft_adapter) -> Path:
    return make_peft_adapter("v1", r=8, target_modules=["q_proj", "v_proj"])[0]


@pytest.fixture
def v2(make_peft_adapter) -> Path:
    return make_peft_adapter("v2", seed=1, r=4, target_modules=["o_proj"])[0]


def test_start_up_of_another_process_keeps_an_upload_in_flight(tmp_path, v1):
    """Start-up recovery must not delete another process's staging (it used to delete them all)."""
    root = tmp_path / "store"
    writer = AdapterStore(root)
    opened = []

    def validate(staged: Path) -> None:  # mid-upload, a second replica starts on the same directory
        opened.append(AdapterStore(root))

    meta = writer.put("a", v1, validate=validate)
    assert len(opened) == 1 and writer.get_meta("a") == meta and writer.verify("a")
    assert opened[0].get_meta("a") == meta  # and the other process sees it at once


def test_staging_is_removed_only_when_its_writer_is_gone(tmp_path, v1):
    store = AdapterStore(tmp_path / "store", staging_min_age=0)
    with store.staging.new() as live:
        (live / "part").write_bytes(b"x")
        assert store.staging.sweep(store.fs_now() + 3600) == []  # old, but its lock is held
        assert live.is_dir()
    staging = store.root / "staging"
    (staging / "h-2-dead").mkdir()
    (staging / "h-2-dead.lock").touch()
    young = AdapterStore(tmp_path / "store", staging_min_age=600)  # abandoned but too young: kept
    assert young.staging.sweep(young.fs_now()) == [] and (staging / "h-2-dead").is_dir()
    assert store.staging.sweep(store.fs_now()) == ["h-2-dead"] and os.listdir(staging) == []


def test_every_store_object_sees_every_write(tmp_path, v1, v2):
    a, b = AdapterStore(tmp_path / "s"), AdapterStore(tmp_path / "s")
    first = a.put("x", v1)
    assert b.get_meta("x") == first
    with pytest.raises(AdapterExists):
        b.put("x", v2)
    second = b.put("x", v2, replace=True)
    assert a.get_meta("x") == second and second.generation == 2
    assert a.key("x") == b.key("x") and a.key("x") is not None
    a.delete("x")
    with pytest.raises(UnknownAdapter):
        b.get_meta("x")
    assert b.scan().keys() == {"x"} and b.list() == []


def _churn(root: str, files: list[dict[str, bytes]], worker: int, rounds: int) -> int:
    """Put/replace/delete the same id from another process; returns how many writes succeeded."""
    store = AdapterStore(Path(root))
    done = 0
    for i in range(rounds):
        try:
            if (i + worker) % 3 == 2:
                store.delete("x")
            else:
                store.put("x", files[(i + worker) % 2], replace=True)
            done += 1
        except UnknownAdapter:
            pass
        if worker == 0 and i % 4 == 0:
            GarbageCollector(store, grace=0).collect()  # collects racing with the writers
    return done


@pytest.mark.slow
def test_concurrent_writers_in_separate_processes(tmp_path, v1, v2):
    """Three processes write one id at once: every write gets its own generation, the final ref
    names a complete version, nothing is left in staging."""
    root = tmp_path / "store"
    AdapterStore(root)
    files = [{p.name: p.read_bytes() for p in d.iterdir()} for d in (v1, v2)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        done = pool.starmap(_churn, [(str(root), files, w, 12) for w in range(3)])
    store = AdapterStore(root)
    record = decode((root / "refs" / "x.json").read_bytes())
    assert record.generation == sum(done) and sum(done) >= 24
    if isinstance(record, StoredAdapterMeta):
        assert store.verify("x") and record.checksum in {_sha(f) for f in files}
    assert os.listdir(root / "staging") == [] and not list((root / "refs").glob(".tmp-*"))


def _sha(files: dict[str, bytes]) -> str:
    return hashlib.sha256(files[WEIGHTS_NAME]).hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_gc_waits_out_the_grace_period(tmp_path, v1, v2):
    store = AdapterStore(tmp_path / "store")
    old = store.put("a", v1)
    new = store.put("a", v2, replace=True)
    clock = Clock()
    gc = GarbageCollector(store, grace=60, clock=clock)
    assert gc.collect() == []  # first seen unreferenced now: the clock starts
    clock.now += 59
    assert gc.collect() == [] and store.version_path(old.version).is_dir()
    clock.now += 1
    assert gc.collect() == [old.version]
    assert not store.version_path(old.version).exists() and store.verify("a")
    assert os.listdir(store.root / "trash") == [] and store.get_meta("a") == new


def test_gc_keeps_versions_a_live_lease_lists(tmp_path, v1, v2):
    store = AdapterStore(tmp_path / "store")
    old = store.put("a", v1)
    store.delete("a")
    lease = Lease(AdapterStore(tmp_path / "store"))  # another replica, still serving `old`
    assert lease.renew({old.version})
    clock = Clock()
    gc = GarbageCollector(store, grace=0, clock=clock)
    assert gc.collect() == [] and store.version_path(old.version).is_dir()
    lease.release()
    assert gc.collect() == [old.version]


def test_gc_ignores_the_lease_of_a_dead_process(tmp_path, v1):
    store = AdapterStore(tmp_path / "store")
    old = store.put("a", v1)
    store.delete("a")
    lease = Lease(store)
    lease.renew({old.version})
    gc = GarbageCollector(store, grace=0)
    past = store.fs_now() - 2 * LEASE_TTL
    os.utime(lease.path, (past, past))  # not renewed for two TTLs: its process is gone
    assert gc.collect() == [old.version]
    assert lease.path.exists()  # the file itself stays until STALE_LEASE
    past = store.fs_now() - STALE_LEASE
    os.utime(lease.path, (past, past))
    gc.collect()
    assert not lease.path.exists()


def test_gc_never_removes_a_version_that_becomes_referenced_again(tmp_path, v1, v2):
    store = AdapterStore(tmp_path / "store")
    old = store.put("a", v1)
    store.put("a", v2, replace=True)
    clock = Clock()
    gc = GarbageCollector(store, grace=60, clock=clock)
    gc.collect()
    clock.now += 30
    store.put("b", v1)  # the same content again: it reuses the version and resets its clock
    gc.collect()
    clock.now += 60
    assert gc.collect() == [] and store.verify("b") and store.get_meta("b").version == old.version


def test_lease_renews_when_its_versions_change_or_it_is_due(tmp_path):
    store = AdapterStore(tmp_path / "store")
    clock = Clock()
    lease = Lease(store, clock=clock)
    assert lease.renew({"v1"}) and not lease.renew({"v1"})
    assert lease.renew({"v1", "v2"})
    clock.now += 10
    assert lease.renew({"v1", "v2"})
    assert json.loads(lease.path.read_text())["versions"] == ["v1", "v2"]


def _legacy_adapter(root: Path, name: str, src: Path, adapter_id: str | None = None) -> dict:
    d = root / name
    d.mkdir(parents=True)
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    meta = {"adapter_id": adapter_id or name, "size_bytes": 1, "created_at": 1234.5,
            "checksum": hashlib.sha256((src / WEIGHTS_NAME).read_bytes()).hexdigest()}
    (d / "meta.json").write_text(json.dumps(meta))
    return meta


def test_first_layout_store_is_imported(tmp_path, v1, v2):
    """A store written by the previous release: one dir per adapter, plus what its crashes left."""
    root = tmp_path / "store"
    a = _legacy_adapter(root, "a", v1)
    _legacy_adapter(root, "versions", v2)  # an id that is now a layout name
    _legacy_adapter(root, ".old-1", v2, adapter_id="b")  # replace of b interrupted between renames
    _legacy_adapter(root, ".old-2", v2, adapter_id="a")  # stale: a was fully replaced
    _legacy_adapter(root, ".deleted-3", v1, adapter_id="c")
    (root / ".staging-4").mkdir()
    store = AdapterStore(root, staging_min_age=0)
    assert [m.adapter_id for m in store.list()] == ["a", "b", "versions"]
    assert store.get_meta("a").checksum == a["checksum"] and store.get_meta("a").created_at == 1234.5
    assert all(store.verify(i) for i in ("a", "b", "versions"))
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "leases", "locks", "refs", "staging", "store.json", "trash", "versions"]
    old_names = (".old", ".deleted", ".staging", ".v1")
    assert [p.name for p in root.iterdir() if p.name.startswith(old_names)] == []
    assert AdapterStore(root).list() == store.list()


def test_corrupt_first_layout_adapter_is_left_alone(tmp_path, v1):
    root = tmp_path / "store"
    _legacy_adapter(root, "a", v1)
    (root / "a" / WEIGHTS_NAME).write_bytes(b"damaged")
    store = AdapterStore(root)
    assert store.list() == [] and (root / "a" / "meta.json").is_file()


def test_commit_lock_excludes_across_store_objects(tmp_path):
    """The commit lock is an flock: held through one store object, another's commit waits."""
    a, b = AdapterStore(tmp_path / "s"), AdapterStore(tmp_path / "s")
    with file_lock(a.root / "locks" / "commit.lock"):
        fd = os.open(b.root / "locks" / "commit.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    with b.locked():  # released on leaving the block: b takes it
        pass
