"""The unified reclaim order (GreedyDual-Size over cached KV blocks and idle adapters) and the pool's
parked units. Pure Python, exact page ids."""

import pytest

from server.evictor import CostMeter, Evictor
from server.pool import OutOfPages, PagePool


def test_equal_costs_are_plain_lru_across_kinds():
    ev = Evictor()
    ev.add("adapter", 1, (0, 1))
    ev.add("kv_block", b"x", (2, 3))
    ev.add("adapter", 2, (4,))
    assert ev.num_pages == 5
    assert ev.order() == [("adapter", 1), ("kv_block", b"x"), ("adapter", 2)]
    assert ev.remove("kv_block", b"x") == (2, 3)  # used again: out of the order
    ev.add("kv_block", b"x", (2, 3))  # parked again: most recent now
    assert [ev.pop()[:2] for _ in range(3)] == [("adapter", 1), ("adapter", 2), ("kv_block", b"x")]
    assert ev.evictions == {"kv_block": 1, "adapter": 2} and ev.num_pages == 0
    with pytest.raises(IndexError):
        ev.pop()


def test_cheaper_kind_goes_first_but_ages_out_expensive_units():
    ev = Evictor()
    ev.set_cost("kv_block", 1.0)
    ev.set_cost("adapter", 0.25)  # an adapter page is 4x cheaper to bring back than a KV page
    ev.add("kv_block", b"old", (0,))  # priority 1.0
    popped = []
    for uid in range(4):
        ev.add("adapter", uid, (10 + uid,))  # priority L + 0.25, L = last evicted priority
        popped.append(ev.pop()[:2])
    # adapters parked after the block go first until L reaches the block's priority; then the old
    # block (parked earlier, so first at the tie) goes before the newest adapter
    assert popped == [("adapter", 0), ("adapter", 1), ("adapter", 2), ("kv_block", b"old")]
    assert ev.order() == [("adapter", 3)]
    with pytest.raises(ValueError, match="positive"):
        ev.set_cost("adapter", 0.0)


def test_cost_meter_waits_for_both_measurements():
    ev = Evictor()
    meter = CostMeter(ev, block_size=16, num_layers=30)
    meter.step(0.5, 8)  # fewer tokens than a block: mostly fixed cost, not used
    meter.step(1.6, 160)  # 10 ms a token
    assert ev.cost("kv_block") == 1.0  # adapters not measured yet: still plain LRU
    meter.adapter_copy(0.001, 200)
    assert ev.cost("kv_block") == pytest.approx(0.01 * 16 / 30)
    assert ev.cost("adapter") == pytest.approx(0.001 / 200)
    meter.adapter_copy(0.003, 200)  # running average, weight 0.1
    assert ev.cost("adapter") == pytest.approx(0.001 / 200 + 0.1 * (0.003 - 0.001) / 200)


def _pool_with_reclaimers(n: int):
    pool = PagePool(n)
    forgotten: list = []
    pool.set_reclaimer("kv_block", forgotten.append)
    pool.set_reclaimer("adapter", forgotten.append)
    return pool, forgotten


def test_allocate_takes_empty_pages_before_reclaiming_parked_units():
    pool, forgotten = _pool_with_reclaimers(6)
    a = pool.allocate(2, "adapter")
    kv = pool.allocate(2)
    pool.park("adapter", 7, tuple(a))
    pool.park("kv_block", b"h", tuple(kv))
    assert (pool.num_free, pool.num_empty) == (6, 2)
    assert pool.allocate(2) == [4, 5] and forgotten == []
    assert pool.allocate(3) == [0, 1, 2]  # the adapter (parked first) went whole, then the block
    assert forgotten == [7, b"h"]
    assert pool.num_free == 1 and pool.used("adapter") == 0


def test_parked_pages_need_a_sole_holder_and_reclaim_is_all_or_nothing():
    pool, forgotten = _pool_with_reclaimers(4)
    pages = pool.allocate(2)
    pool.incref(pages)  # a request reads them besides their owner
    with pytest.raises(ValueError, match="2 references"):
        pool.park("kv_block", b"h", tuple(pages))
    pool.free(pages)
    pool.park("kv_block", b"h", tuple(pages))
    held = pool.allocate(2)
    with pytest.raises(OutOfPages):
        pool.allocate(3)
    assert forgotten == [] and pool.num_free == 2  # nothing was evicted
    assert pool.unpark("kv_block", b"h") and not pool.unpark("kv_block", b"h")
    assert pool.num_free == 0 and held == [2, 3]


def test_retag_moves_pages_between_kinds():
    pool = PagePool(4)
    pages = pool.allocate(2)
    pool.retag(pages, "cached")
    assert (pool.used("kv"), pool.used("cached")) == (0, 2)
    pool.free(pages)
    assert pool.used("cached") == 0 and pool.num_empty == 4


def test_cache_bookkeeping_does_not_import_torch():
    src = "".join(open(f"server/{m}.py").read() for m in ("evictor", "prefix_cache", "pool", "kv_manager"))
    assert "import torch" not in src
