"""The unified page pool's bookkeeping: a free list, reference counts, and reclaimable units. No torch.

The arena (a device tensor) is cut into ``num_pages`` equal pages; this class hands out their
ids. KV blocks and resident adapters draw from the same pages, which is what lets the split
between them follow the load. Each page is tagged with the kind that holds it so the split can be
reported: ``kv`` (blocks of running requests, shared cached blocks included), ``cached`` (cached KV
blocks no request uses), ``adapter`` (resident adapters, idle or pinned).

A page's reference count is the number of holders: a request's private KV page has one; a cached
KV block's pages have one for the prefix cache plus one per request reading them.

Pages held only as a cache (an unreferenced cached KV block, an idle adapter) are *parked*: they
stay allocated, with their owner's single reference, but ``allocate`` may reclaim them. It takes
empty pages first, then evicts parked units in the order of ``server/evictor.py``, telling each
unit's owner through the reclaimer it registered. ``num_free`` counts both (as vLLM's free block
count includes evictable cached blocks). Empty pages are handed out lowest id first at the start, and
freed pages go back to the *front* of the empty list (LIFO reuse, in the order they were freed): the
pages a step just released are the next ones taken. They are warm (in cache and TLB, and already
backed by memory: a page of the arena's fresh mapping costs a fault and zero-fill at its first
touch, 2-3x the write itself on the VMs measured), and a running server keeps touching the few pages
its load needs instead of cycling through the whole arena. Deterministic either way, so tests can
pin page ids.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Literal

from server.evictor import Evictor, UnitKind

PageKind = Literal["kv", "cached", "adapter"]
Reclaimer = Callable[[Hashable], None]


class OutOfPages(Exception):
    """Not enough free pages; nothing was allocated."""

    def __init__(self, wanted: int, free: int) -> None:
        super().__init__(f"wanted {wanted} pages, {free} free")
        self.wanted = wanted
        self.free = free


class PagePool:
    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages
        self._kind: list[PageKind | None] = [None] * num_pages
        self._used_by_kind: dict[PageKind, int] = {"kv": 0, "cached": 0, "adapter": 0}
        self.parked = Evictor()
        self._reclaimers: dict[UnitKind, Reclaimer] = {}

    @property
    def num_free(self) -> int:
        """Pages ``allocate`` can hand out: empty ones plus those of parked units."""
        return len(self._free) + self.parked.num_pages

    @property
    def num_empty(self) -> int:
        """Pages holding nothing at all (taking them evicts nothing)."""
        return len(self._free)

    def used(self, kind: PageKind) -> int:
        return self._used_by_kind[kind]

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int, kind: PageKind = "kv") -> list[int]:
        """Take ``n`` pages (all or nothing), each with reference count 1, evicting parked units
        (least valuable first) once the empty pages run out."""
        if n > self.num_free:
            raise OutOfPages(n, self.num_free)
        while len(self._free) < n:
            unit_kind, key, pages = self.parked.pop()
            # Behind the empty pages, in eviction order: all of those are taken now anyway.
            self._free.extend(self._release(list(pages)))
            self._reclaimers[unit_kind](key)
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
            self._kind[p] = kind
        self._used_by_kind[kind] += n
        return pages

    def incref(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] == 0:
                raise ValueError(f"page {p} is free")
            self._refs[p] += 1

    def free(self, pages: list[int]) -> None:
        """Drop one reference from each page; pages that reach zero return to the front of the free
        list, so that the next ``allocate`` takes them first, in this order."""
        self._free.extendleft(reversed(self._release(pages)))

    def _release(self, pages: list[int]) -> list[int]:
        """Drop one reference from each page; the pages that reached zero, now untagged."""
        released: list[int] = []
        for p in pages:
            if self._refs[p] == 0:
                raise ValueError(f"page {p} is already free")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                kind = self._kind[p]
                assert kind is not None
                self._used_by_kind[kind] -= 1
                self._kind[p] = None
                released.append(p)
        return released

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def kind(self, page: int) -> PageKind | None:
        return self._kind[page]

    def retag(self, pages: tuple[int, ...] | list[int], kind: PageKind) -> None:
        """Move allocated pages to another kind (a cached KV block is ``kv`` while in use,
        ``cached`` while parked)."""
        for p in pages:
            old = self._kind[p]
            if old is None:
                raise ValueError(f"page {p} is free")
            self._used_by_kind[old] -= 1
            self._used_by_kind[kind] += 1
            self._kind[p] = kind

    # ---- parked units -----------------------------------------------------------------------
    def set_reclaimer(self, kind: UnitKind, reclaimer: Reclaimer) -> None:
        """``reclaimer(key)`` is called after a parked unit of ``kind`` was evicted and its pages
        freed: the owner forgets the unit."""
        self._reclaimers[kind] = reclaimer

    def park(self, kind: UnitKind, key: Hashable, pages: tuple[int, ...]) -> None:
        """Make a unit evictable. Its pages must be held by its owner alone (count 1)."""
        if kind not in self._reclaimers:
            raise ValueError(f"no reclaimer for {kind} units")
        for p in pages:
            if self._refs[p] != 1:
                raise ValueError(f"page {p} has {self._refs[p]} references; only sole holders park")
        self.parked.add(kind, key, pages)

    def unpark(self, kind: UnitKind, key: Hashable) -> bool:
        """Take a unit back out of the eviction order (in use again, or dropped by its owner)."""
        return self.parked.remove(kind, key) is not None
