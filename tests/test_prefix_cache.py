"""Prefix caching in the scheduler and the pool: hash chains per adapter version, shared read-only
blocks, parking and reclaim, preemption, abort, retired adapters. Pure Python, exact page ids.

LAYOUT: 2 layers, 4-token blocks; a block is 2 pages (one per layer), allocated block-major.
"""

import pytest

from server.prefix_cache import hash_block
from server.request import Request, RequestStatus
from server.sampling_params import SamplingParams
from tests.sched_helpers import FakeDisk, make_scheduler, run_step


def caching(num_pages: int, disk: FakeDisk | None = None, **cfg):
    return make_scheduler(num_pages, disk, enable_prefix_caching=True, **cfg)


def add(s, rid: str, tokens: list[int], max_tokens: int = 8, adapter: int | None = None) -> Request:
    req = Request(rid, tokens, SamplingParams(max_tokens=max_tokens, temperature=0),
                  arrival=s.next_arrival(), adapter_uid=adapter, eos_token_ids=(0,))
    s.add(req)
    return req


P = list(range(1, 11))  # 10 tokens: two full blocks and a partial one


def test_hash_chain_names_the_prefix_and_the_adapter():
    a = hash_block(b"", 0, [1, 2, 3, 4])
    assert a == hash_block(b"", 0, [1, 2, 3, 4]) and len(a) == 32
    assert a != hash_block(b"", 1, [1, 2, 3, 4])  # another adapter (or version)
    assert hash_block(a, 0, [5, 6, 7, 8]) != hash_block(hash_block(b"", 0, [9, 2, 3, 4]), 0, [5, 6, 7, 8])


def test_second_request_reads_the_cached_prefix_and_computes_the_rest():
    s = caching(32)
    add(s, "a", P)
    out = run_step(s)
    assert out.chunks[0].block_table == [[0, 2, 4], [1, 3, 5]]
    assert s.cache.num_blocks == 2  # the two full blocks, registered when scheduled
    assert [s.pool.refcount(p) for p in range(6)] == [2, 2, 2, 2, 1, 1]  # cache + a; partial block a's
    add(s, "b", P[:9])
    out = s.schedule()
    b = next(c for c in out.chunks if c.request_id == "b")
    assert (b.token_ids, b.start_pos, b.sample) == ([9], 8, True)
    assert b.block_table == [[0, 2, 6], [1, 3, 7]]  # shared blocks 0 and 1, its own block 2
    assert [s.pool.refcount(p) for p in (0, 1, 2, 3)] == [3, 3, 3, 3]
    assert (s.cache.stats.queries, s.cache.stats.hits) == (10 + 9, 8)


def test_same_step_requests_share_blocks_registered_in_that_step():
    # The step writes every chunk's K/V before any attention reads them, so b may read a's
    # blocks in the very step that fills them.
    s = caching(32)
    add(s, "a", P)
    add(s, "b", P[:9])
    out = s.schedule()
    assert [(c.request_id, c.start_pos, len(c.token_ids)) for c in out.chunks] == [("a", 0, 10), ("b", 8, 1)]


def test_the_last_prompt_token_is_always_computed():
    s = caching(32)
    add(s, "a", P[:8], max_tokens=1)  # exactly two blocks
    run_step(s)
    assert not s.has_work() and s.cache.num_blocks == 2
    add(s, "b", P[:8], max_tokens=1)
    out = s.schedule()
    # block 1 holds the last token, whose logits are needed: only block 0 is taken
    assert [(c.start_pos, c.token_ids) for c in out.chunks] == [(4, [5, 6, 7, 8])]
    assert out.chunks[0].block_table == [[0, 4], [1, 5]]
    s.update(out, {"b": 3})
    # b's block 1 duplicates the cached one: it stays b's own and goes back to the pool
    assert s.cache.num_blocks == 2 and s.pool.num_empty == 32 - 4


def test_same_prompt_under_two_adapters_never_shares_blocks():
    disk = FakeDisk()
    disk.add(1, rank=2)
    disk.add(2, rank=2)
    s = caching(64, disk)
    add(s, "x1", P, adapter=1)
    run_step(s)
    add(s, "x2", P, adapter=2)
    add(s, "base", P)
    out = s.schedule()
    tables = {c.request_id: c.block_table for c in out.chunks}
    assert {c.request_id: c.start_pos for c in out.chunks} == {"x1": 10, "x2": 0, "base": 0}
    pages = {rid: {p for layer in t for p in layer} for rid, t in tables.items()}
    assert not pages["x1"] & pages["x2"] and not pages["x1"] & pages["base"]
    assert not pages["x2"] & pages["base"]
    assert s.cache.num_blocks == 6 and s.cache.stats.hits == 0
    add(s, "x1-again", P, adapter=1)
    s.update(out, {"x1": 5, "x2": 5, "base": 5})
    out = s.schedule()
    again = next(c for c in out.chunks if c.request_id == "x1-again")
    assert again.start_pos == 8 and again.block_table[0][:2] == tables["x1"][0][:2]


def test_finished_blocks_park_tail_first_and_are_reclaimed_under_pressure():
    s = caching(8)  # four blocks in all
    add(s, "a", P[:8], max_tokens=1)
    run_step(s)  # a is done; its two blocks stay cached, no request reads them
    assert (s.pool.used("kv"), s.pool.used("cached"), s.pool.num_free) == (0, 4, 8)
    order = s.pool.parked.order()
    assert [k for k, _ in order] == ["kv_block", "kv_block"]
    assert s.cache._by_page[2].block_hash == order[0][1]  # the tail block (pages 2, 3) goes first
    add(s, "b", list(range(100, 112)), max_tokens=1)  # 3 blocks, nothing in common
    out = s.schedule()
    assert out.chunks[0].block_table == [[4, 6, 2], [5, 7, 3]]  # empty pages, then a's tail block
    assert s.pool.parked.evictions["kv_block"] == 1 and s.cache.num_blocks == 1 + 3  # a's head + b's
    add(s, "c", P[:6], max_tokens=1)
    s.update(out, {"b": 1})
    out = s.schedule()
    assert out.chunks[0].start_pos == 4  # a's head block survived; its tail was evicted


def test_chunked_prefill_registers_each_filled_block():
    s = caching(64, max_num_batched_tokens=6)
    add(s, "a", list(range(1, 15)))  # 14 tokens: chunks of 6, 6, 2
    run_step(s)
    assert s.cache.num_blocks == 1  # tokens 0..5: block 0 full, block 1 half
    run_step(s)
    assert s.cache.num_blocks == 3
    add(s, "b", list(range(1, 13)) + [99])
    out = s.schedule()
    got = {c.request_id: (c.start_pos, len(c.token_ids)) for c in out.chunks}
    assert got == {"a": (12, 2), "b": (12, 1)}


def test_preempted_request_recomputes_from_its_cached_blocks():
    s = caching(6, max_num_batched_tokens=64)  # three blocks
    add(s, "old", [1, 2, 3, 4], max_tokens=8)
    add(s, "new", [5, 6, 7, 8], max_tokens=8)
    run_step(s)  # each fills one block (registered) and samples; each needs a second block next
    out = s.schedule()
    assert out.preempted == ["new"]
    new = s.requests["new"]
    assert new.status is RequestStatus.WAITING and new.block_table == []
    assert s.pool.used("cached") == 2  # new's block is parked, not lost
    s.update(out, {"old": 9})
    s.finish("old", "abort")
    out = s.schedule()
    (c,) = out.chunks
    assert (c.request_id, c.token_ids, c.start_pos) == ("new", [7], 4)  # only the sampled token
    assert (s.cache.stats.preempted_queries, s.cache.stats.preempted_hits) == (5, 4)


def test_abort_releases_shared_and_own_blocks():
    s = caching(32)
    add(s, "a", P)
    add(s, "b", P[:9] + [77, 78])
    run_step(s)
    s.finish("a", "abort")
    assert [s.pool.refcount(p) for p in (0, 1, 2, 3)] == [2, 2, 2, 2]  # the cache and b
    s.finish("b", "abort")
    assert s.pool.used("kv") == 0 and s.pool.used("cached") == 4
    assert s.pool.num_free == 32 and not s.has_work()


def test_retired_adapter_blocks_are_dropped_at_once():
    disk = FakeDisk()
    disk.add(1, rank=2)
    s = caching(64, disk)
    add(s, "r", P, adapter=1, max_tokens=1)
    add(s, "base", P, max_tokens=1)
    run_step(s)
    assert s.cache.num_blocks == 4
    s.cache.drop_adapter(1)
    assert s.cache.num_blocks == 2 and s.cache.stats.dropped_blocks == 2
    assert s.pool.used("cached") == 4  # base's two blocks only
    add(s, "r2", P, adapter=1)
    out = s.schedule()
    assert out.chunks[0].start_pos == 0


def test_dropping_blocks_still_read_hands_them_to_their_readers():
    disk = FakeDisk()
    disk.add(1, rank=2)
    s = caching(64, disk)
    add(s, "r", P, adapter=1)
    run_step(s)
    s.cache.drop_adapter(1)  # (the engine only retires uids no request uses; the cache copes anyway)
    assert s.cache.num_blocks == 0
    before = s.pool.num_empty
    s.finish("r", "abort")
    assert s.pool.num_empty == before + 6 and s.pool.used("cached") == 0


@pytest.mark.parametrize("kv_cost,evicted", [(1.0, "kv_block"), (100.0, "adapter")])
def test_idle_adapter_and_cached_blocks_share_one_reclaim_order(kv_cost, evicted):
    disk = FakeDisk()
    disk.add(1, rank=2)  # 4 pages
    s = caching(10, disk)
    s.pool.parked.set_cost("kv_block", kv_cost)  # per page, against 1.0 for an adapter page
    add(s, "r", [1, 2, 3, 4, 5], adapter=1, max_tokens=1)
    run_step(s)
    # r released its full block (parked first), then unpinned its adapter; 4 pages are empty
    assert [k for k, _ in s.pool.parked.order()] == (
        ["kv_block", "adapter"] if evicted == "kv_block" else ["adapter", "kv_block"])
    add(s, "x", list(range(100, 109)), max_tokens=1)  # 3 blocks: 4 empty pages + one unit
    out = s.schedule()
    assert s.pool.parked.evictions == {kind: int(kind == evicted) for kind in ("kv_block", "adapter")}
    assert out.evicted_adapters == ([1] if evicted == "adapter" else [])
    assert s.residency.is_resident(1) is (evicted == "kv_block")
    assert s.cache.num_blocks == 2 + (evicted == "adapter")  # x's two full blocks (+ r's)
