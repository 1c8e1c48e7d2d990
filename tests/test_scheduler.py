"""Scheduler: continuous batching, chunked prefill, admission, preemption, abort. Exact page ids."""

from server.request import RequestStatus
from tests.sched_helpers import make_request, make_scheduler, run_step


def test_prefill_then_decode_allocates_blocks_per_layer():
    s = make_scheduler(16)
    make_request(s, "a", prompt_len=5)
    out = s.schedule()
    (c,) = out.chunks
    assert (c.token_ids, c.start_pos, c.sample) == ([1, 2, 3, 4, 5], 0, True)
    # 5 tokens -> 2 blocks; block-major: block0 = pages 0 (layer0), 1 (layer1); block1 = 2, 3
    assert c.block_table == [[0, 2], [1, 3]]
    s.update(out, {"a": 42})
    out = s.schedule()
    (c,) = out.chunks
    assert (c.token_ids, c.start_pos) == ([42], 5)
    assert s.pool.num_free == 12


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    s = make_scheduler(64, max_num_batched_tokens=4)
    make_request(s, "a", prompt_len=2)
    run_step(s)  # a prefilled, sampled its first token
    make_request(s, "b", prompt_len=10)
    out = s.schedule()
    got = [(c.request_id, len(c.token_ids), c.sample) for c in out.chunks]
    assert got == [("a", 1, True), ("b", 3, False)]
    s.update(out, {"a": 9})
    out = s.schedule()
    assert [(c.request_id, c.start_pos, len(c.token_ids)) for c in out.chunks] == [("a", 3, 1), ("b", 3, 3)]
    s.update(out, {"a": 9})
    out = s.schedule()
    assert [(c.request_id, c.start_pos, len(c.token_ids), c.sample) for c in out.chunks] == [
        ("a", 4, 1, True), ("b", 6, 3, False)]


def test_finish_on_max_tokens_and_eos_frees_every_page():
    s = make_scheduler(16)
    make_request(s, "a", prompt_len=3, max_tokens=2)
    make_request(s, "b", prompt_len=3, max_tokens=5)
    run_step(s)
    out = s.schedule()
    touched = s.update(out, {"a": 5, "b": 0})  # b hits EOS (id 0), a reaches max_tokens
    assert {r.request_id: r.finish_reason for r in touched} == {"a": "length", "b": "stop"}
    assert s.pool.num_free == 16 and not s.has_work()


def test_admission_waits_for_pages_fcfs():
    s = make_scheduler(4)  # two blocks in all
    make_request(s, "a", prompt_len=8, max_tokens=1)  # needs both blocks
    make_request(s, "b", prompt_len=1)
    out = s.schedule()
    assert [c.request_id for c in out.chunks] == ["a"]
    assert s.requests["b"].status is RequestStatus.WAITING
    s.update(out, {"a": 3})  # a finishes (max_tokens=1)
    out = s.schedule()
    assert [c.request_id for c in out.chunks] == ["b"]
    # a's pages came back layer by layer ([0, 2] then [1, 3]); LIFO reuse hands out 1 then 3
    assert out.chunks[0].block_table == [[1], [3]]


def test_preemption_frees_newest_and_recomputes_it():
    s = make_scheduler(6, max_num_batched_tokens=64)  # 3 blocks
    make_request(s, "old", prompt_len=4, max_tokens=8)
    make_request(s, "new", prompt_len=4, max_tokens=8)
    run_step(s)  # each holds 1 block (4 tokens) + sampled token 5 -> each needs a 2nd block next
    assert s.pool.num_free == 2
    out = s.schedule()
    # old gets the last free block; new cannot grow, is preempted, and its pages go back
    assert out.preempted == ["new"]
    assert [c.request_id for c in out.chunks] == ["old"]
    assert s.requests["new"].status is RequestStatus.WAITING and s.requests["new"].block_table == []
    assert s.pool.num_free == 2
    s.update(out, {"old": 8})
    s.finish("old", "abort")
    out = s.schedule()
    (c,) = out.chunks
    # recomputed from prompt + the token it already produced
    assert (c.request_id, c.token_ids, c.start_pos, c.sample) == ("new", [1, 2, 3, 4, 7], 0, True)
    assert s.requests["new"].num_preemptions == 1


def test_abort_mid_decode_frees_pages_at_once():
    s = make_scheduler(16)
    make_request(s, "a", prompt_len=6)
    make_request(s, "b", prompt_len=2)
    run_step(s)
    run_step(s)
    assert s.pool.num_free == 16 - 4 - 2
    req = s.finish("a", "abort")
    assert req.finish_reason == "abort" and s.pool.num_free == 14
    s.finish("b", "abort")
    assert s.pool.num_free == 16 and not s.has_work()
    assert s.finish("b", "abort") is None


def test_max_num_seqs():
    s = make_scheduler(64, max_num_seqs=2)
    for rid in "abc":
        make_request(s, rid, prompt_len=1)
    out = s.schedule()
    assert [c.request_id for c in out.chunks] == ["a", "b"]


def test_many_requests_all_pages_return():
    s = make_scheduler(12, max_num_batched_tokens=8)
    for i in range(10):
        make_request(s, f"r{i}", prompt_len=3 + i % 4, max_tokens=3 + i % 5)
    steps = 0
    while s.has_work():
        run_step(s, token=9)
        steps += 1
        assert steps < 500
    assert s.pool.num_free == 12
