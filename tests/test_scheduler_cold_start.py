"""An idle engine holds its first step for adapter reads in flight (SchedulerConfig.cold_start_wait):
until the ready prompts fill the token budget, every read is done, or the wait is over. Running
requests are never held."""

from __future__ import annotations

from sched_helpers import FakeDisk, make_request, make_scheduler, run_step


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def setup(wait: float = 0.1, budget: int = 32):
    disk, clock = FakeDisk(), Clock()
    sched = make_scheduler(64, disk, clock, max_num_batched_tokens=budget, cold_start_wait=wait)
    return sched, disk, clock


def warm_and_cold(wait: float = 0.1, budget: int = 32, warm_len: int = 4, warm_max: int = 8):
    """An idle scheduler with a request whose adapter is in host memory and one whose isn't."""
    sched, disk, clock = setup(wait, budget)
    disk.add(1, rank=2)
    disk.add(2, rank=2, ready=False)
    make_request(sched, "warm", warm_len, max_tokens=warm_max, adapter=1)
    make_request(sched, "cold", 4, adapter=2)
    return sched, disk, clock


def ids(out) -> list[str]:
    return [c.request_id for c in out.chunks]


def test_holds_until_every_read_is_done() -> None:
    sched, disk, clock = setup()
    disk.add(1, rank=2)  # in host memory already
    disk.add(2, rank=2, ready=False)
    disk.add(3, rank=2, ready=False)
    make_request(sched, "warm", 4, adapter=1)
    make_request(sched, "cold-a", 4, adapter=2)
    make_request(sched, "cold-b", 4, adapter=3)
    assert ids(run_step(sched)) == []  # 4 ready tokens of 32, two reads in flight
    assert {2, 3} <= set(disk.requested)  # the reads were started while holding
    clock.now += 0.05
    disk.ready.add(2)
    assert ids(run_step(sched)) == []  # still one read in flight
    disk.ready.add(3)
    assert ids(run_step(sched)) == ["warm", "cold-a", "cold-b"]


def test_no_hold_once_the_ready_prompts_fill_the_budget() -> None:
    sched, _, _ = warm_and_cold(budget=8, warm_len=8)
    assert ids(run_step(sched)) == ["warm"]


def test_the_hold_ends_after_the_wait_and_starts_again_for_the_next_burst() -> None:
    sched, disk, clock = warm_and_cold(warm_max=2)
    assert ids(run_step(sched)) == []
    clock.now += 0.2  # past the whole cold_start_wait
    assert ids(run_step(sched)) == ["warm"]
    assert ids(run_step(sched)) == ["warm"]  # its decode; it finishes after 2 tokens
    assert not sched.running
    # idle again with the same read in flight and a new ready request: a fresh hold
    make_request(sched, "warm2", 4, adapter=1)
    assert ids(run_step(sched)) == []
    clock.now += 0.2
    assert ids(run_step(sched)) == ["warm2"]


def test_running_requests_are_never_held() -> None:
    sched, disk, clock = setup()
    disk.add(1, rank=2)
    disk.add(2, rank=2, ready=False)
    make_request(sched, "warm", 4, max_tokens=4, adapter=1)
    assert ids(run_step(sched)) == ["warm"]
    make_request(sched, "cold", 4, adapter=2)
    make_request(sched, "base", 4)
    # a decode runs: the ready newcomer is admitted beside it at once, the cold one waits for its read
    assert ids(run_step(sched)) == ["warm", "base"]


def test_without_a_wait_the_first_ready_request_starts_at_once() -> None:
    sched, _, _ = warm_and_cold(wait=0.0)
    assert ids(run_step(sched)) == ["warm"]


def test_base_requests_alone_are_not_held() -> None:
    sched, disk, clock = setup()
    make_request(sched, "base", 4)
    assert ids(run_step(sched)) == ["base"]
