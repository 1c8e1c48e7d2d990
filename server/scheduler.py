"""Iteration-level scheduler over the unified pool. Plain Python; its output is plain data.

There is no separate prefill phase (as in vLLM v1): every request simply has tokens whose K/V are
not yet in the pages (the whole prompt at first, one sampled token while decoding), and each step
hands out a token budget. Running requests go first, oldest first, so decodes are never stalled
by a long prompt: a prompt that doesn't fit the rest of the budget is computed in chunks over
several steps. Waiting requests are admitted first-come-first-served while pages, budget and
sequence slots last; one whose adapter is still being read from disk is skipped (it waits, the
rest go on) and its adapter is fetched in the background.

A burst of requests on cold adapters meets an idle engine: nothing runs, the first adapter to arrive
from disk would start a step of one short prompt, and the reads of the others would then run beside
that step and every step after, on the same cores. So while nothing runs and reads are in flight, the
scheduler holds the first step, for at most ``cold_start_wait`` seconds, until the ready prompts fill
the token budget (64 requests over 2,000 cold adapters, 2 cores: without the hold the first step
computed one 40-token prompt in 0.3-0.7 s while the other 63 adapters were read beside it, and the
next, 512 tokens, took 1.1-2.0 s). Running requests are never held.

With prefix caching on, a request admitted (or readmitted after preemption) starts from the
longest chain of cached KV blocks that matches its tokens under its adapter version and computes
only the rest; each scheduled chunk registers the blocks it fills (``server/prefix_cache.py``).

When pages run out, the pool reclaims parked units first, unreferenced cached KV blocks and idle
resident adapters in one order (``server/evictor.py``), then the newest running request is
preempted: its pages are released and it goes back to the front of the queue, to be recomputed
from its prompt and the tokens it already produced (reading whatever of them is still cached).
Nothing is dropped.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.adapter_residency import AdapterResidency, AdapterSpec
from server.engine_types import FinishReason
from server.kv_manager import KVManager
from server.page_layout import AdapterPageTable, PageLayout
from server.pool import PagePool
from server.prefix_cache import NoPrefixCache, PrefixCache
from server.request import Request, RequestStatus


class AdapterSource(Protocol):
    def spec_if_ready(self, uid: int) -> AdapterSpec | None:
        """The adapter's shape if its weights are in host memory; else start loading, return None."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_adapters_per_step: int | None = None
    enable_prefix_caching: bool = True
    cold_start_wait: float = 0.0  # seconds an idle engine may hold its first step for adapter reads


@dataclass(frozen=True)
class ScheduledChunk:
    """``token_ids`` go in at positions ``start_pos...``; ``block_table`` is valid until update()."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[list[int]]
    adapter_uid: int | None
    sample: bool  # the chunk reaches the end of the known tokens: sample the next one


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    adapter_loads: list[AdapterPageTable] = field(default_factory=list)  # copy in before the step
    evicted_adapters: list[int] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, pool: PagePool, layout: PageLayout,
                 adapters: AdapterSource, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self._held_since: float | None = None  # when an idle engine started holding for reads
        self.pool = pool
        self.cache = PrefixCache(pool, layout) if cfg.enable_prefix_caching else NoPrefixCache()
        self.kv = KVManager(pool, layout, self.cache)
        self.residency = AdapterResidency(pool, layout)
        self.adapters = adapters
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # ordered by arrival
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.preemptions_total = 0

    def next_arrival(self) -> int:
        return next(self._arrivals)

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens
        step_adapters: set[int] = set()
        scheduled: set[str] = set()
        # Decodes first, then prefill chunks: a long prompt never stalls running decodes.
        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for req in decodes + prefills:
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._reserve_kv(req, n, out, scheduled):
                continue
            out.chunks.append(self._chunk(req, n))
            self.cache.register(req, req.num_computed_tokens + n)
            scheduled.add(req.request_id)
            if req.adapter_uid is not None:
                step_adapters.add(req.adapter_uid)
            budget -= n
        held = not self.running and self._hold_for_reads(budget)
        if not out.preempted and not held:
            self._admit(out, budget, step_adapters)
        self._prefetch(out)
        out.evicted_adapters = self.residency.drain_evicted()
        return out

    def _admit(self, out: SchedulerOutput, budget: int, step_adapters: set[int]) -> None:
        cap = self.cfg.max_adapters_per_step
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.cfg.max_num_seqs:
                return
            uid = req.adapter_uid
            if uid is not None and cap is not None and uid not in step_adapters and len(step_adapters) >= cap:
                continue
            spec = None
            if uid is not None and not self.residency.is_resident(uid):
                spec = self.adapters.spec_if_ready(uid)
                if spec is None:
                    continue  # being read from disk; later requests may go ahead
            # Cached blocks are taken first, so that making room below can't evict them.
            hits = self.cache.lookup(req)
            self.kv.attach_prefix(req, hits)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._place(req, spec, n, out):
                self.kv.free(req)
                req.num_computed_tokens = 0
                return  # pages are held by running work: wait, first come first served
            self.cache.record(req, len(hits))
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(self._chunk(req, n))
            self.cache.register(req, req.num_computed_tokens + n)
            if uid is not None:
                step_adapters.add(uid)
            budget -= n

    def _hold_for_reads(self, budget: int) -> bool:
        """True while an idle engine should wait for adapter reads in flight: the requests that could
        start now don't fill ``budget``, and it has waited less than ``cold_start_wait``."""
        if self.cfg.cold_start_wait <= 0:
            return False
        ready, reading = 0, False
        for req in itertools.islice(self.waiting, self.cfg.max_num_seqs):
            uid = req.adapter_uid
            if uid is None or self.residency.is_resident(uid) or self.adapters.spec_if_ready(uid) is not None:
                ready += req.num_tokens - req.num_computed_tokens
                if ready >= budget:
                    break
            else:
                reading = True
        if reading and ready < budget:
            now = self.clock()
            if self._held_since is None:
                self._held_since = now
            if now - self._held_since < self.cfg.cold_start_wait:
                return True
        self._held_since = None
        return False

    def _place(self, req: Request, spec: AdapterSpec | None, n: int, out: SchedulerOutput) -> bool:
        """Load ``req``'s adapter if ``spec`` is given, pin it, and give ``req`` pages for ``n``
        more tokens; False (the adapter stays loaded, unpinned) if the pages aren't there."""
        uid = req.adapter_uid
        if spec is not None:
            if not self.pool.can_allocate(spec.pages_needed(self.kv.layout)):
                return False
            out.adapter_loads.append(self.residency.load(spec))
        if uid is not None:
            self.residency.pin(uid)
        if not self.pool.can_allocate(self.kv.pages_needed(req, n)):
            if uid is not None:
                self.residency.unpin(uid)
            return False
        self.kv.allocate(req, n)
        return True

    def _prefetch(self, out: SchedulerOutput) -> None:
        """Start reading the adapters of queued requests into host memory, and copy those already
        there into empty pages, so they are resident when their turn comes. Prefetching never
        evicts and leaves a block per layer for every running request as headroom."""
        headroom = len(self.running) * self.kv.layout.num_layers
        for req in itertools.islice(self.waiting, self.cfg.max_num_seqs):
            uid = req.adapter_uid
            if uid is None or self.residency.is_resident(uid):
                continue
            spec = self.adapters.spec_if_ready(uid)
            if spec is not None and spec.pages_needed(self.kv.layout) + headroom <= self.pool.num_empty:
                out.adapter_loads.append(self.residency.load(spec))

    def _reserve_kv(self, req: Request, n: int, out: SchedulerOutput, scheduled: set[str]) -> bool:
        """Give ``req`` pages for ``n`` more tokens, evicting parked units and then preempting the
        newest running requests not yet scheduled this step. False if ``req`` itself was preempted."""
        need = self.kv.pages_needed(req, n)
        while not self.pool.can_allocate(need):
            victim = next(r for r in reversed(self.running) if r.request_id not in scheduled)
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            if victim is req:
                return False
        self.kv.allocate(req, n)
        return True

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        return ScheduledChunk(
            request_id=req.request_id,
            token_ids=req.token_slice(start, start + n),
            start_pos=start,
            block_table=req.block_table,
            adapter_uid=req.adapter_uid,
            sample=start + n == req.num_tokens,
        )

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.preemptions_total += 1

    def _release(self, req: Request) -> None:
        self.kv.free(req)
        if req.adapter_uid is not None and req.status is RequestStatus.RUNNING:
            self.residency.unpin(req.adapter_uid)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Account the step: advance computed tokens, append sampled tokens, finish requests.

        Returns the requests that received a token this step (finished ones included).
        """
        touched = []
        for chunk in out.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue
            req.num_computed_tokens += len(chunk.token_ids)
            if chunk.sample:
                req.output_token_ids.append(sampled[chunk.request_id])
                touched.append(req)
                reason = req.check_stop()
                if reason is not None:
                    self.finish(req.request_id, reason)
        return touched

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """End a request now (done, stop string, abort): its pages go back to the pool at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._release(req)
        else:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        return req
