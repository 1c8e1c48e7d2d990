"""The adapter registry against the store: races inside one process, and registries of several
processes (here: several managers over one directory) seeing each other's writes at once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from adapter_store.host_cache import HostCache
from adapter_store.peft_format import load_peft_adapter
from adapter_store.store import AdapterStore
from server.adapters import AdapterManager
from server.errors import UnknownAdapter
from server.page_layout import PageLayout


@pytest.fixture
def v1(make_peft_adapter) -> Path:
    return make_peft_adapter("v1", r=8, target_modules=["q_proj", "v_proj"])[0]


@pytest.fixture
def v2(make_peft_adapter) -> Path:
    return make_peft_adapter("v2", seed=1, r=4, target_modules=["q_proj", "o_proj"])[0]


class ForgetfulCache(HostCache):
    """Takes adapters of any size but keeps none."""

    def put(self, key, value):
        return value


@pytest.fixture
def manager_on(tiny_model_config, tiny_base_weights):
    """Factory: a registry over the store at ``root`` whose host cache keeps nothing, so every weight
    read goes to disk (as when the host cache has dropped an adapter under pressure)."""
    made = []

    def make(root: Path) -> AdapterManager:
        layout = PageLayout.for_model(tiny_model_config)
        m = AdapterManager(AdapterStore(root), tiny_model_config, layout, 4096, 2**30, 256, torch.float32,
                           tiny_base_weights)
        m.host = ForgetfulCache(2**30)
        made.append(m)
        return m

    yield make
    for m in made:
        m.shutdown()


def weights_equal(got, directory: Path, model_config) -> bool:
    want = load_peft_adapter(directory, model_config).weights
    return got.keys() == want.keys() and all(
        torch.equal(got[k].a, want[k].a) and torch.equal(got[k].b, want[k].b) for k in want)


def test_replace_keeps_an_admitted_request_on_its_version(tmp_path, manager_on, v1, v2, tiny_model_config):
    """A request admitted before a replace reads the old weights, even from disk after the replace."""
    m = manager_on(tmp_path / "store")
    m.add("a", v1)
    admitted = m.acquire("a")
    m.add("a", v2, replace=True)
    assert weights_equal(m.host_weights(admitted.uid), v1, tiny_model_config)
    new = m.acquire("a")
    assert new.uid != admitted.uid and weights_equal(m.host_weights(new.uid), v2, tiny_model_config)


def test_delete_keeps_an_admitted_request_on_its_version(tmp_path, manager_on, v1, tiny_model_config):
    m = manager_on(tmp_path / "store")
    m.add("a", v1)
    admitted = m.acquire("a")
    m.remove("a")
    with pytest.raises(UnknownAdapter):
        m.acquire("a")
    assert weights_equal(m.host_weights(admitted.uid), v1, tiny_model_config)
    m.release(admitted.uid)
    assert m.drain_retired() == [admitted.uid]


def test_delete_racing_an_upload_of_the_same_id(tmp_path, manager_on, v1, v2, tiny_model_config):
    """A delete that removed its files after giving up its lock could destroy an upload of the same
    id committed in between: the registry then served an adapter whose files were gone."""
    m = manager_on(tmp_path / "store")
    m.add("a", v1)
    real_delete = m.store.delete
    upload = threading.Thread(target=lambda: m.add("a", v2, replace=True))

    def delete_with_upload_in_between(adapter_id: str):
        upload.start()
        upload.join(timeout=2)  # the upload gets every chance to run while the delete is under way
        return real_delete(adapter_id)

    m.store.delete = delete_with_upload_in_between
    m.remove("a")
    upload.join()
    listed = [r.adapter_id for r in m.list()]
    assert listed == (["a"] if m.store.exists("a") else [])  # registry and disk agree
    if listed:  # the upload committed last: what is listed is readable, and it is v2
        assert weights_equal(m.host_weights(m.acquire("a").uid), v2, tiny_model_config)


def test_other_processes_see_upload_replace_delete_at_once(tmp_path, manager_on, v1, v2, tiny_model_config):
    """Each process used to read the store only at start-up."""
    here, there = manager_on(tmp_path / "store"), manager_on(tmp_path / "store")
    here.add("a", v1)
    first = there.acquire("a")  # no restart, no wait: the miss re-reads the ref
    assert first.meta == here.resolve("a").meta
    here.add("a", v2, replace=True)
    second = there.acquire("a")
    assert second.uid != first.uid and second.meta.generation == 2
    assert weights_equal(there.host_weights(first.uid), v1, tiny_model_config)
    assert weights_equal(there.host_weights(second.uid), v2, tiny_model_config)
    here.remove("a")
    with pytest.raises(UnknownAdapter):
        there.acquire("a")
    there.release(first.uid)
    there.release(second.uid)
    assert sorted(there.drain_retired()) == [first.uid, second.uid]


def test_sync_catches_up_on_ids_nobody_asked_for(tmp_path, manager_on, v1, v2):
    here, there = manager_on(tmp_path / "store"), manager_on(tmp_path / "store")
    here.add("a", v1)
    here.add("b", v2)
    assert [r.adapter_id for r in there.list(sync=True)] == ["a", "b"]
    assert there.versions_in_use() == {here.resolve("a").meta.version, here.resolve("b").meta.version}
    here.remove("a")
    assert [r.adapter_id for r in there.list(sync=True)] == ["b"]
    assert len(there.drain_retired()) == 1


def test_a_tombstone_is_not_re_read_on_every_request(tmp_path, manager_on, v1, monkeypatch):
    here = manager_on(tmp_path / "store")
    here.add("a", v1)
    here.remove("a")
    reads = []
    real_read = here.store.read
    monkeypatch.setattr(here.store, "read", lambda i: reads.append(i) or real_read(i))
    for _ in range(3):
        with pytest.raises(UnknownAdapter):
            here.acquire("a")
        with pytest.raises(UnknownAdapter):
            here.acquire("never-stored")
    assert reads == []


def test_watcher_ticks_list_the_refs_only_when_their_directory_changed(tmp_path, manager_on, v1, v2,
                                                                       monkeypatch):
    here, there = manager_on(tmp_path / "store"), manager_on(tmp_path / "store")
    now = [0.0]
    there._clock = lambda: now[0]
    scans = []
    real_scan = there.store.scan
    monkeypatch.setattr(there.store, "scan", lambda: scans.append(1) or real_scan())
    there.sync()  # a full sync always lists
    there.sync(full=False)
    there.sync(full=False)
    assert len(scans) == 1 and there.names() == []
    here.add("a", v1)  # another replica's upload renames a ref into the directory
    there.sync(full=False)
    assert len(scans) == 2 and there.names() == ["a"]
    there.sync(full=False)
    assert len(scans) == 2
    now[0] += 5.0  # FULL_SCAN_SECONDS: a tick lists again whatever the stamp says
    there.sync(full=False)
    assert len(scans) == 3
    here.remove("a")
    here.add("b", v2)
    there.sync(full=False)
    assert len(scans) == 4 and there.names() == ["b"]
