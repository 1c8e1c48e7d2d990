"""The one reclaim order of the unified pool: what to evict first when pages run out. No torch.

Two things hold pool pages only as a cache, to be given up when something needs the room: an
unreferenced cached KV block (its prefix may be asked for again) and an idle resident adapter (a
request may name it again). Both are *units* here, evicted whole: a KV block is one page per
layer, an adapter all its pages. Pages held by running work (a request's own blocks, cached blocks
it reads, pinned adapters) are never units, so they are never evicted; the scheduler preempts
instead.

How a cached KV block is weighed against an idle adapter. FASTLIBRA (arXiv 2505.03756) keeps LoRAs
and KV blocks in one pool and swaps out the entry whose loss costs least, from a cost model of
what it takes to bring each back. We do the same with GreedyDual-Size (Cao & Irani 1997), the
cost-aware generalisation of LRU: a unit parked (made evictable) gets priority ``L + c``, where
``c`` is its re-creation cost *per page* and ``L`` is the priority of the last unit evicted; the
lowest priority goes first, ties in parking order. With equal costs this is exactly LRU. A kind
whose pages cost more to re-create outlives a cheaper one parked at the same time by about one
cache turnover per unit of cost difference, and an old expensive unit still goes before a fresh
cheap one once ``L`` has passed it, so nothing stays forever on cost alone.

The costs are measured, not guessed (``set_cost``; the engine feeds running averages): a KV block
costs the prefill of ``block_size`` tokens through the whole model, spread over its
``num_layers`` pages; an adapter costs its copy from host memory into its pages, per page.
Measured with SmolLM2 on a busy 2-core CPU: ~4 ms (fp32) to ~10 ms (bf16) a KV page against
~0.06 ms an adapter page, so an idle adapter goes well before a cached prefix parked at the same
time; on a GPU, where a host-to-device copy is slow next to compute, the two come out closer and
the order nearer LRU. Until both are measured the costs are equal (plain LRU). An adapter that
has left the host cache costs a disk read on top; that is not counted (the host cache is sized to
hold the working set).

FASTLIBRA also keeps a usage dependency: KV computed under an adapter is worthless without that
adapter. Here it never becomes *wrong* (blocks are keyed by the adapter's uid, which a replace or
delete changes, and the blocks of a retired uid are dropped at once by the prefix cache), and an
evicted adapter's blocks stay usable after a reload that costs a copy; so the cost order decides.
Parking order still follows the dependency: a finished request parks its blocks (last block
first) before unpinning its adapter, so at equal cost a prefix's tail goes before its head and an
adapter after its own blocks.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

UnitKind = Literal["kv_block", "adapter"]
UNIT_KINDS: tuple[UnitKind, ...] = ("kv_block", "adapter")


@dataclass(frozen=True)
class _Unit:
    pages: tuple[int, ...]
    priority: float
    seq: int


class Evictor:
    """Evictable units keyed by (kind, key), popped lowest priority first."""

    def __init__(self) -> None:
        self._units: dict[tuple[UnitKind, Hashable], _Unit] = {}
        self._heap: list[tuple[float, int, UnitKind, Hashable]] = []  # stale entries skipped on pop
        self._seq = itertools.count()
        self._inflation = 0.0  # GreedyDual's L: the priority of the last unit evicted
        self._cost: dict[UnitKind, float] = dict.fromkeys(UNIT_KINDS, 1.0)
        self.num_pages = 0
        self.evictions: dict[UnitKind, int] = dict.fromkeys(UNIT_KINDS, 0)

    def __len__(self) -> int:
        return len(self._units)

    def __contains__(self, unit: tuple[UnitKind, Hashable]) -> bool:
        return unit in self._units

    def cost(self, kind: UnitKind) -> float:
        return self._cost[kind]

    def set_cost(self, kind: UnitKind, per_page: float) -> None:
        """Re-creation cost of one page of ``kind`` (seconds, or any unit all kinds share)."""
        if not per_page > 0:
            raise ValueError(f"cost per page must be positive, got {per_page}")
        self._cost[kind] = per_page

    def add(self, kind: UnitKind, key: Hashable, pages: tuple[int, ...]) -> None:
        if (kind, key) in self._units:
            raise ValueError(f"{kind} {key!r} is already evictable")
        unit = _Unit(pages, self._inflation + self._cost[kind], next(self._seq))
        self._units[(kind, key)] = unit
        heapq.heappush(self._heap, (unit.priority, unit.seq, kind, key))
        self.num_pages += len(pages)

    def remove(self, kind: UnitKind, key: Hashable) -> tuple[int, ...] | None:
        """Take a unit out of the order (it is in use again, or dropped); its pages, or None."""
        unit = self._units.pop((kind, key), None)
        if unit is None:
            return None
        self.num_pages -= len(unit.pages)
        if len(self._heap) > 2 * len(self._units) + 64:
            self._compact()
        return unit.pages

    def pop(self) -> tuple[UnitKind, Hashable, tuple[int, ...]]:
        """Evict the lowest-priority unit: (kind, key, pages). Raises IndexError when empty."""
        while True:
            priority, seq, kind, key = heapq.heappop(self._heap)
            unit = self._units.get((kind, key))
            if unit is not None and unit.seq == seq:
                break
        del self._units[(kind, key)]
        self.num_pages -= len(unit.pages)
        self._inflation = priority
        self.evictions[kind] += 1
        return kind, key, unit.pages

    def order(self) -> list[tuple[UnitKind, Hashable]]:
        """Every unit, next to be evicted first (for tests and debugging)."""
        return [k for k, _ in sorted(self._units.items(), key=lambda kv: (kv[1].priority, kv[1].seq))]

    def _compact(self) -> None:
        self._heap = [(u.priority, u.seq, kind, key) for (kind, key), u in self._units.items()]
        heapq.heapify(self._heap)


class CostMeter:
    """Feeds measured re-creation costs into an ``Evictor`` (running averages, seconds per page).

    KV: a step's time over its tokens, from steps of at least a block of tokens (smaller ones are
    mostly fixed per-step cost), times ``block_size`` tokens, over the block's ``num_layers``
    pages. Adapter: the time of its copy from host memory into its pages, per page.
    """

    def __init__(self, evictor: Evictor, block_size: int, num_layers: int, weight: float = 0.1) -> None:
        self.evictor = evictor
        self.block_size = block_size
        self.num_layers = num_layers
        self.weight = weight
        self.token_seconds: float | None = None
        self.adapter_page_seconds: float | None = None

    def step(self, seconds: float, num_tokens: int) -> None:
        if num_tokens >= self.block_size and seconds > 0:
            self.token_seconds = self._average(self.token_seconds, seconds / num_tokens)
            self._push()

    def adapter_copy(self, seconds: float, num_pages: int) -> None:
        if num_pages > 0 and seconds > 0:
            self.adapter_page_seconds = self._average(self.adapter_page_seconds, seconds / num_pages)
            self._push()

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.weight * (new - old)

    def _push(self) -> None:
        if self.token_seconds is None or self.adapter_page_seconds is None:
            return  # both kinds keep the same cost (plain LRU) until both are measured
        self.evictor.set_cost("kv_block", self.token_seconds * self.block_size / self.num_layers)
        self.evictor.set_cost("adapter", self.adapter_page_seconds)
