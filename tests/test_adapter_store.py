"""Disk store (content-addressed versions, atomic refs, tombstones, crash recovery, ids) and the host
LRU cache. Sharing one store between processes: tests/test_shared_store.py."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapter_store.host_cache import HostCache
from adapter_store.peft_format import WEIGHTS_NAME, load_peft_adapter
from adapter_store.refs import Tombstone
from adapter_store.store import ADAPTER_ID_PATTERN, AdapterStore
from server.errors import AdapterExists, InvalidAdapter, InvalidRequest, PayloadTooLarge, UnknownAdapter

LAYOUT = ["leases", "locks", "refs", "staging", "store.json", "trash", "versions"]


@pytest.fixture
def adapter_dir(make_peft_adapter) -> Path:
    return make_peft_adapter("src", r=8, target_modules=["q_proj", "v_proj"])[0]


@pytest.fixture
def other_dir(make_peft_adapter) -> Path:
    return make_peft_adapter("src2", seed=1, r=4, target_modules=["o_proj"])[0]


def sha(path: Path) -> str:
    return hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()


def entries(path: Path) -> list[str]:
    """Visible entries (the hidden open lock and temp files aside)."""
    return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))


def leftovers(store: AdapterStore) -> list[str]:
    """Anything in staging/ or trash/, and temp files next to the refs."""
    root = store.root
    return sorted([*os.listdir(root / "staging"), *os.listdir(root / "trash"),
                   *(p.name for p in (root / "refs").glob(".tmp-*"))])


def test_put_from_dir_and_reopen(tmp_path, adapter_dir, tiny_model_config):
    store = AdapterStore(tmp_path / "store")
    meta = store.put("math-v1", adapter_dir)
    assert meta.adapter_id == "math-v1" and meta.checksum == sha(adapter_dir) and meta.generation == 1
    path = store.get_path("math-v1")
    assert path == store.root / "versions" / meta.version
    assert entries(path) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    assert entries(store.root) == LAYOUT and entries(store.root / "refs") == ["math-v1.json"]
    assert store.exists("math-v1") and store.verify("math-v1")
    assert load_peft_adapter(path, tiny_model_config).checksum == meta.checksum
    reopened = AdapterStore(tmp_path / "store")
    assert reopened.list() == [meta]


def test_version_is_the_content_hash(tmp_path, adapter_dir, other_dir):
    """Equal content is stored once whatever the id; a different file changes the version."""
    store = AdapterStore(tmp_path / "store")
    a = store.put("a", adapter_dir)
    b = store.put("b", adapter_dir)
    c = store.put("c", other_dir)
    assert a.version == b.version != c.version and len(a.version) == 64
    assert entries(store.root / "versions") == sorted({a.version, c.version})
    (adapter_dir / "README.md").write_text("another readme")
    assert store.put("d", adapter_dir).version not in (a.version, c.version)


def test_put_from_bytes(tmp_path, adapter_dir):
    store = AdapterStore(tmp_path / "store")
    files = {p.name: p.read_bytes() for p in adapter_dir.iterdir()}
    files["training_args.bin"] = b"pickle"  # extras next to the safetensors are ignored, not stored
    meta = store.put("a", files)
    assert meta.size_bytes == sum(len(v) for k, v in files.items() if k != "training_args.bin")
    assert not (store.get_path("a") / "training_args.bin").exists()


def test_validate_runs_on_locked_staged_copy(tmp_path, adapter_dir):
    store = AdapterStore(tmp_path / "store")
    seen = []

    def validate(path: Path) -> None:
        seen.append(path)
        assert path.parent == store.root / "staging"
        assert sorted(os.listdir(path.parent)) == [path.name, f"{path.name}.lock"]
        assert (path / WEIGHTS_NAME).is_file() and not store.exists("a")

    store.put("a", adapter_dir, validate=validate)
    assert len(seen) == 1 and store.exists("a") and leftovers(store) == []


def test_failed_validation_leaves_nothing(tmp_path, adapter_dir):
    store = AdapterStore(tmp_path / "store")

    def validate(path: Path) -> None:
        raise InvalidAdapter("nope")

    with pytest.raises(InvalidAdapter, match="nope"):
        store.put("a", adapter_dir, validate=validate)
    assert store.list() == [] and not store.exists("a") and leftovers(store) == []
    assert entries(store.root / "versions") == [] and entries(store.root / "refs") == []


def test_validation_with_real_parser(tmp_path, adapter_dir, tiny_model_config):
    (adapter_dir / WEIGHTS_NAME).write_bytes(b"\x00" * 10)
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(InvalidAdapter, match="corrupt"):
        store.put("a", adapter_dir, validate=lambda p: load_peft_adapter(p, tiny_model_config))
    assert leftovers(store) == [] and entries(store.root / "versions") == []


def test_duplicate_id_and_replace(tmp_path, adapter_dir, other_dir):
    store = AdapterStore(tmp_path / "store")
    first = store.put("a", adapter_dir)
    with pytest.raises(AdapterExists, match="'a'"):
        store.put("a", other_dir)
    assert store.get_meta("a") == first
    second = store.put("a", other_dir, replace=True)
    assert second.checksum == sha(other_dir) != first.checksum and second.generation == 2
    assert store.get_meta("a") == second and store.verify("a")
    assert [m.adapter_id for m in store.list()] == ["a"] and leftovers(store) == []
    # The replaced version stays on disk, unchanged, for requests admitted on it (gc removes it later).
    assert sha(store.version_path(first.version)) == first.checksum


def test_replace_with_failed_validation_keeps_old(tmp_path, adapter_dir, other_dir):
    store = AdapterStore(tmp_path / "store")
    first = store.put("a", adapter_dir)

    def validate(path: Path) -> None:
        raise InvalidAdapter("bad upload")

    with pytest.raises(InvalidAdapter):
        store.put("a", other_dir, replace=True, validate=validate)
    assert store.get_meta("a") == first and leftovers(store) == []


def _failing_rename(monkeypatch, fail_when) -> None:
    real = os.rename

    def rename(src, dst):
        if fail_when(Path(src), Path(dst)):
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def test_failed_version_rename_leaves_nothing(tmp_path, adapter_dir, monkeypatch):
    store = AdapterStore(tmp_path / "store")
    _failing_rename(monkeypatch, lambda src, dst: dst.parent.name == "versions")
    with pytest.raises(OSError, match="simulated"):
        store.put("a", adapter_dir)
    monkeypatch.undo()
    reopened = AdapterStore(tmp_path / "store")
    assert reopened.list() == [] and leftovers(reopened) == [] and entries(reopened.root / "versions") == []


def test_failed_ref_switch_keeps_old(tmp_path, adapter_dir, other_dir, monkeypatch):
    """The ref is the commit point: if its rename fails, the id still names the old version."""
    store = AdapterStore(tmp_path / "store")
    first = store.put("a", adapter_dir)
    _failing_rename(monkeypatch, lambda src, dst: dst.name == "a.json")
    with pytest.raises(OSError, match="simulated"):
        store.put("a", other_dir, replace=True)
    monkeypatch.undo()
    assert store.get_meta("a") == first and store.verify("a") and leftovers(store) == []


def test_recovery_removes_only_abandoned_staging(tmp_path, adapter_dir):
    """What a kill -9 leaves: a staging dir whose writer is gone (its lock free), a temp ref file."""
    store = AdapterStore(tmp_path / "store", staging_min_age=0)
    first = store.put("a", adapter_dir)
    staging = store.root / "staging"
    (staging / "host-1-dead").mkdir()
    (staging / "host-1-dead" / WEIGHTS_NAME).write_bytes(b"half")
    (staging / "host-1-dead.lock").touch()
    reopened = AdapterStore(tmp_path / "store", staging_min_age=0)
    assert reopened.list() == [first] and reopened.verify("a") and leftovers(reopened) == []


def test_delete_is_a_tombstone(tmp_path, adapter_dir):
    store = AdapterStore(tmp_path / "store")
    meta = store.put("a", adapter_dir)
    key, tomb = store.delete("a")
    assert tomb == Tombstone("a", 2, tomb.deleted_at) and store.read("a") == (key, tomb)
    assert not store.exists("a") and store.list() == [] and entries(store.root / "refs") == ["a.json"]
    with pytest.raises(UnknownAdapter):
        store.delete("a")
    with pytest.raises(UnknownAdapter):
        store.get_path("a")
    assert AdapterStore(tmp_path / "store").list() == []
    again = store.put("a", adapter_dir)  # re-upload after delete: generations keep counting up
    assert again.generation == 3 and again.version == meta.version


def test_verify_detects_corruption(tmp_path, adapter_dir):
    store = AdapterStore(tmp_path / "store")
    store.put("a", adapter_dir)
    path = store.get_path("a") / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not store.verify("a")


def test_refuses_pickle_only_upload(tmp_path, adapter_dir):
    store = AdapterStore(tmp_path / "store")
    (adapter_dir / WEIGHTS_NAME).rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(InvalidAdapter, match="adapter_model.bin"):
        store.put("a", adapter_dir)
    assert leftovers(store) == [] and store.list() == []


def test_payload_too_large(tmp_path, adapter_dir):
    store = AdapterStore(tmp_path / "store", max_adapter_bytes=1000)
    with pytest.raises(PayloadTooLarge, match="1000"):
        store.put("a", adapter_dir)
    assert leftovers(store) == [] and store.list() == []


@pytest.mark.parametrize(
    "bad", ["", ".hidden", "../etc", "a/b", "a..b", "-x", "_x", "x" * 129, "a b", "café", ".staging-1"]
)
def test_invalid_ids(tmp_path, adapter_dir, bad):
    store = AdapterStore(tmp_path / "store")
    for call in (lambda: store.put(bad, adapter_dir), lambda: store.exists(bad), lambda: store.delete(bad)):
        with pytest.raises(InvalidRequest) as info:
            call()
        assert info.value.param == "adapter_id" and ADAPTER_ID_PATTERN in info.value.message
    assert entries(store.root / "refs") == [] and leftovers(store) == []


@pytest.mark.parametrize("good", ["a", "Llama-3_math.v2", "x" * 128, "0", "versions", "store.json",
                                  "acme:support-bot"])
def test_valid_ids(tmp_path, adapter_dir, good):
    store = AdapterStore(tmp_path / "store")
    meta = store.put(good, adapter_dir)
    assert meta.tenant == (good.split(":")[0] if ":" in good else None)  # adapter_store/tenancy.py
    assert [m.adapter_id for m in store.list()] == [good]
    assert AdapterStore(tmp_path / "store").list() == [meta]


# ---- host cache ----------------------------------------------------------------------------------


@dataclass
class Blob:
    nbytes: int


def test_host_cache_lru_order_and_bound():
    cache: HostCache[Blob] = HostCache(max_bytes=100)
    a, b, c = Blob(40), Blob(30), Blob(20)
    for key, item in (("a", a), ("b", b), ("c", c)):
        assert cache.put(key, item) is item
    assert cache.keys() == ["a", "b", "c"] and cache.bytes_used == 90
    assert cache.get("a") is a
    assert cache.keys() == ["b", "c", "a"]
    cache.put("d", Blob(30))  # 120 > 100: evicts b only
    assert cache.keys() == ["c", "a", "d"] and cache.bytes_used == 90
    assert "b" not in cache and cache.get("b") is None
    cache.put("e", Blob(50))  # 140: evicts c (-> 120), then a (-> 80)
    assert cache.keys() == ["d", "e"] and cache.bytes_used == 80 and cache.evictions == 3


def test_host_cache_oversized_item_not_cached():
    cache: HostCache[Blob] = HostCache(max_bytes=100)
    cache.put("a", Blob(60))
    big = Blob(101)
    assert cache.put("big", big) is big
    assert "big" not in cache and cache.keys() == ["a"] and cache.bytes_used == 60


def test_host_cache_replace_pop_contains():
    cache: HostCache[Blob] = HostCache(max_bytes=100)
    cache.put("a", Blob(10))
    cache.put("b", Blob(10))
    assert "a" in cache and cache.keys() == ["a", "b"]  # membership does not touch recency
    cache.put("a", Blob(50))
    assert cache.keys() == ["b", "a"] and cache.bytes_used == 60
    assert cache.pop("a") == Blob(50) and cache.pop("a") is None
    assert cache.bytes_used == 10 and len(cache) == 1


def test_host_cache_threads_keep_invariants():
    cache: HostCache[Blob] = HostCache(max_bytes=1000)

    def worker(tid: int) -> None:
        for i in range(300):
            cache.put((tid, i % 17), Blob(10 + (i * 7 + tid) % 90))
            cache.get((tid, (i * 3) % 17))
            if i % 5 == 0:
                cache.pop((tid, (i + 1) % 17))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < cache.bytes_used <= 1000
    assert cache.bytes_used == sum(cache.get(k).nbytes for k in cache.keys())


def test_host_cache_holds_parsed_adapters(adapter_dir, other_dir, tiny_model_config):
    first = load_peft_adapter(adapter_dir, tiny_model_config)
    second = load_peft_adapter(other_dir, tiny_model_config)
    cache = HostCache(max_bytes=first.nbytes + second.nbytes - 1)
    cache.put(1, first)
    cache.put(2, second)
    assert cache.keys() == [2] and cache.bytes_used == second.nbytes
