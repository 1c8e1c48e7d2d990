"""Small fixtures for the pure-Python scheduler and residency tests."""

from __future__ import annotations

import time
from collections.abc import Callable

from server.adapter_residency import AdapterSpec, ModuleSpec
from server.page_layout import PageLayout
from server.pool import PagePool
from server.request import Request
from server.sampling_params import SamplingParams
from server.scheduler import Scheduler, SchedulerConfig

# 2 layers, 4-token blocks, 1 KV head of dim 2: a page is 16 elements, a KV block takes 2 pages.
LAYOUT = PageLayout(page_elems=16, block_size=4, num_layers=2, num_kv_heads=1, head_dim=2)


class FakeDisk:
    """An AdapterSource whose adapters become ready when the test says so (no threads)."""

    def __init__(self) -> None:
        self.specs: dict[int, AdapterSpec] = {}
        self.ready: set[int] = set()
        self.requested: list[int] = []

    def add(self, uid: int, rank: int, ready: bool = True, layers: int = 2) -> AdapterSpec:
        # one module of 8 in / 8 out per layer: rows of 8 elements, 2 per page
        modules = {(i, "q_proj"): ModuleSpec(rank, 1.0, 8, 8) for i in range(layers)}
        spec = AdapterSpec(uid, f"a{uid}", modules)
        self.specs[uid] = spec
        if ready:
            self.ready.add(uid)
        return spec

    def spec_if_ready(self, uid: int) -> AdapterSpec | None:
        if uid in self.ready:
            return self.specs[uid]
        self.requested.append(uid)
        return None


def make_scheduler(num_pages: int, disk: FakeDisk | None = None,
                   clock: Callable[[], float] = time.monotonic, **cfg) -> Scheduler:
    """Prefix caching is off unless asked for: these tests pin the plain allocator's page ids
    (tests/test_prefix_cache.py turns it on)."""
    cfg.setdefault("enable_prefix_caching", False)
    return Scheduler(SchedulerConfig(**cfg), PagePool(num_pages), LAYOUT, disk or FakeDisk(), clock)


def make_request(sched: Scheduler, rid: str, prompt_len: int, max_tokens: int = 8,
                 adapter: int | None = None) -> Request:
    req = Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, temperature=0),
                  arrival=sched.next_arrival(), adapter_uid=adapter, eos_token_ids=(0,))
    sched.add(req)
    return req


def run_step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    sched.update(out, {c.request_id: token for c in out.chunks if c.sample})
    return out
