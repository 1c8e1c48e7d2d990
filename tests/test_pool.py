"""PagePool: allocation order, refcounts, kinds. Pure Python."""

import sys

import pytest

from server.pool import OutOfPages, PagePool


def test_allocation_order_and_lifo_reuse():
    pool = PagePool(8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2, "adapter") == [3, 4]
    pool.free([1])
    assert pool.allocate(2) == [1, 5]  # the page just freed (warm) before a never-used one
    pool.free([3, 0])
    pool.free([4])
    assert pool.allocate(4) == [4, 3, 0, 6]  # the last freed first; one free() call's pages in order
    assert pool.num_free == 1


def test_all_or_nothing():
    pool = PagePool(4)
    pool.allocate(3)
    with pytest.raises(OutOfPages) as err:
        pool.allocate(2)
    assert err.value.wanted == 2 and err.value.free == 1
    assert pool.num_free == 1


def test_refcounts():
    pool = PagePool(4)
    pages = pool.allocate(2)
    pool.incref(pages)
    assert pool.refcount(0) == 2
    pool.free(pages)
    assert pool.num_free == 2 and pool.refcount(0) == 1
    pool.free(pages)
    assert pool.num_free == 4
    with pytest.raises(ValueError, match="already free"):
        pool.free([0])
    with pytest.raises(ValueError, match="is free"):
        pool.incref([1])


def test_usage_by_kind():
    pool = PagePool(8)
    kv = pool.allocate(3, "kv")
    ad = pool.allocate(2, "adapter")
    assert (pool.used("kv"), pool.used("adapter"), pool.num_free) == (3, 2, 3)
    pool.free(kv)
    pool.free(ad)
    assert (pool.used("kv"), pool.used("adapter"), pool.num_free) == (0, 0, 8)


def test_bookkeeping_does_not_import_torch():
    for mod in ("server.pool", "server.scheduler", "server.adapter_residency", "server.kv_manager"):
        __import__(mod)
        assert "torch" not in getattr(sys.modules[mod], "__dict__", {})
    src = "".join(open(f"server/{m}.py").read() for m in ("pool", "scheduler", "adapter_residency",
                                                          "kv_manager", "request", "page_layout"))
    assert "import torch" not in src
