"""Adapter residency in the unified pool: LRU, pins, sizes by rank, KV/adapter trading. Exact ids."""

import pytest

from server.adapter_residency import AdapterResidency, AdapterSpec, ModuleSpec
from server.errors import AdapterTooLarge
from server.pool import OutOfPages, PagePool
from tests.sched_helpers import LAYOUT, FakeDisk, make_request, make_scheduler, run_step


def test_pages_scale_with_rank():
    disk = FakeDisk()
    # rows of 8 in a 16-element page: 2 rows a page; one stream of A and B^T rows over 2 layers
    assert disk.add(1, rank=2).pages_needed(LAYOUT) == 2 * (1 + 1)
    assert disk.add(2, rank=8).pages_needed(LAYOUT) == 2 * (4 + 4)
    assert disk.add(3, rank=1).pages_needed(LAYOUT) == 2  # 4 rows: two matrices share each page


def test_load_assigns_pages_in_module_order():
    pool = PagePool(10)
    res = AdapterResidency(pool, LAYOUT)
    table = res.load(FakeDisk().add(1, rank=4))
    assert table.modules[(0, "q_proj")].a_pages == (0, 1)
    assert table.modules[(0, "q_proj")].b_pages == (2, 3)
    assert table.modules[(1, "q_proj")].a_pages == (4, 5)
    assert pool.used("adapter") == 8


def test_lru_eviction_skips_pinned():
    disk = FakeDisk()
    pool = PagePool(8)
    res = AdapterResidency(pool, LAYOUT)
    for uid in (1, 2, 3):
        res.load(disk.add(uid, rank=2))  # 4 pages each... only two fit
        if uid == 1:
            res.pin(1)
    # loading 3 needed room: 1 is pinned, so 2 (the idle LRU) went
    assert res.resident_uids() == [1, 3]
    assert res.drain_evicted() == [2]
    res.unpin(1)
    res.pin(3)
    res.load(disk.add(4, rank=2))
    assert res.resident_uids() == [3, 4]
    assert res.evictions_total == 2


def test_pinned_adapters_block_and_too_large_is_refused():
    disk = FakeDisk()
    pool = PagePool(8)
    res = AdapterResidency(pool, LAYOUT)
    res.load(disk.add(1, rank=4))
    res.pin(1)
    assert not res.make_room(4)
    with pytest.raises(OutOfPages):
        res.load(disk.add(2, rank=2))
    with pytest.raises(AdapterTooLarge, match="needs 16 pages; the pool has 8"):
        res.load(disk.add(3, rank=8))
    with pytest.raises(ValueError, match="pinned"):
        res.evict(1)


def test_scheduler_loads_adapter_and_pins_while_running():
    disk = FakeDisk()
    disk.add(1, rank=2)
    s = make_scheduler(16, disk)
    make_request(s, "a", prompt_len=2, max_tokens=2, adapter=1)
    out = s.schedule()
    assert [t.uid for t in out.adapter_loads] == [1]
    assert out.chunks[0].adapter_uid == 1
    assert s.residency.pins(1) == 1
    # adapter took pages 0-3, KV block for 2 layers took 4, 5
    assert out.chunks[0].block_table == [[4], [5]]
    s.update(out, {"a": 9})
    run_step(s)  # second token: max_tokens reached
    assert s.residency.pins(1) == 0 and s.residency.is_resident(1)  # idle but still cached
    assert s.pool.used("kv") == 0 and s.pool.used("adapter") == 4


def test_request_waits_for_adapter_from_disk_while_others_run():
    disk = FakeDisk()
    disk.add(1, rank=2, ready=False)
    s = make_scheduler(32, disk)
    make_request(s, "cold", prompt_len=2, adapter=1)
    make_request(s, "base", prompt_len=2)
    out = s.schedule()
    assert [c.request_id for c in out.chunks] == ["base"]
    assert 1 in disk.requested  # the load was started
    s.update(out, {"base": 5})
    disk.ready.add(1)
    out = s.schedule()
    assert sorted(c.request_id for c in out.chunks) == ["base", "cold"]
    assert [t.uid for t in out.adapter_loads] == [1]


def test_kv_pressure_evicts_idle_adapters_before_preempting():
    disk = FakeDisk()
    disk.add(1, rank=4)  # 8 pages
    s = make_scheduler(12, disk)
    make_request(s, "x", prompt_len=1, max_tokens=1, adapter=1)
    run_step(s)  # x done; adapter 1 idle and resident (8 pages), 4 free
    make_request(s, "long", prompt_len=12, max_tokens=1)  # 3 blocks = 6 pages
    out = s.schedule()
    assert out.evicted_adapters == [1] and not out.preempted
    assert [c.request_id for c in out.chunks] == ["long"]


def test_distinct_adapter_cap_per_step():
    disk = FakeDisk()
    for uid in (1, 2, 3):
        disk.add(uid, rank=1)
    s = make_scheduler(64, disk, max_adapters_per_step=2)
    for uid in (1, 2, 3, 1):
        make_request(s, f"r{uid}-{s.next_arrival()}", prompt_len=1, adapter=uid)
    out = s.schedule()
    assert sorted({c.adapter_uid for c in out.chunks}) == [1, 2]
    assert len(out.chunks) == 3  # both adapter-1 requests, the adapter-2 one; adapter 3 waits


def test_prefetch_copies_queued_adapter_into_free_pages():
    disk = FakeDisk()
    disk.add(1, rank=2)
    s = make_scheduler(64, disk, max_num_seqs=1)
    make_request(s, "first", prompt_len=1)
    make_request(s, "queued", prompt_len=1, adapter=1)
    out = s.schedule()
    assert [c.request_id for c in out.chunks] == ["first"]
    assert [t.uid for t in out.adapter_loads] == [1] and s.residency.pins(1) == 0


def test_adapter_waits_for_pages_held_by_running_work():
    disk = FakeDisk()
    disk.add(1, rank=4)  # 8 pages
    s = make_scheduler(10, disk)
    make_request(s, "kv", prompt_len=8, max_tokens=2)  # 2 blocks = 4 pages; 6 free
    run_step(s)
    make_request(s, "lora", prompt_len=1, max_tokens=1, adapter=1)
    out = s.schedule()
    assert [c.request_id for c in out.chunks] == ["kv"] and not out.adapter_loads
    s.update(out, {"kv": 3})  # kv finishes: its pages return
    out = s.schedule()
    assert [t.uid for t in out.adapter_loads] == [1] and [c.request_id for c in out.chunks] == ["lora"]


def test_dora_scales_embedding_rows_and_long_rows_get_their_pages():
    """16-element pages, rows packed into streams by stored row length (server/adapter_packing.py).
    A DoRA q_proj (8 -> 8, rank 4): A 4 rows of 8, B^T 4, its scale row 1. The embedding (vocab
    40 -> 8, rank 2): A stored as 40 rows of 2 (8 a page), B^T 2 rows of 8. lm_head (8 -> 40, rank
    3): A 3 rows of 8; B^T rows of 40 cut into 3 pieces of 16: 9 rows, one a page. Streams: rows of
    16 (9 pages: 0-8), rows of 8 (q.A 0-3, q.B^T 4-7, q.g 8, embed B^T 9-10, lm_head A 11-13, two a
    page: 7 pages, 9-15), rows of 2 (40 rows, 8 a page: 5 pages, 16-20)."""
    spec = AdapterSpec(7, "a", {
        (0, "q_proj"): ModuleSpec(4, 1.0, 8, 8, dora=True),
        (0, "embed_tokens"): ModuleSpec(2, 1.0, 40, 8, a_transposed=True),
        (0, "lm_head"): ModuleSpec(3, 1.0, 8, 40),
    })
    assert spec.pages_needed(LAYOUT) == 9 + 7 + 5
    assert spec.vocab(32) == 40 and AdapterSpec(8, "b", {}).vocab(32) == 32
    table = AdapterResidency(PagePool(30), LAYOUT).load(spec)
    emb, head, q = (table.modules[(0, m)] for m in ("embed_tokens", "lm_head", "q_proj"))
    assert (emb.a_pages, emb.a_row0, emb.b_pages, emb.b_row0, emb.g_pages, emb.a_transposed) == (
        (16, 17, 18, 19, 20), 0, (13, 14), 1, (), True)
    assert (head.a_pages, head.a_row0, head.b_pages, head.b_row0) == ((14, 15), 1, tuple(range(9)), 0)
    assert (q.a_pages, q.b_pages, q.g_pages, q.g_row0, q.dora) == ((9, 10), (11, 12), (13,), 0, True)
    assert table.all_pages() == list(range(21))
