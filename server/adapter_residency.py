"""Which adapters are resident in the unified pool. Plain Python; no torch.

A resident adapter holds pages in proportion to its real ranks and modules (see
``server/page_layout.py``; its rows are packed by ``server/adapter_packing.py``). Adapters used by a
running request are pinned (a count per adapter); idle ones stay resident as a cache: they are parked in
the pool, where KV blocks or another adapter reclaim their pages in one order with unreferenced cached
KV blocks (``server/evictor.py`` says how the two are weighed). Evicted uids are queued so the runner
can drop anything it derived from their pages.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field

from server.adapter_packing import AdapterPacking, pack
from server.errors import AdapterTooLarge
from server.page_layout import STORAGE_ITEMSIZE, AdapterPageTable, PageLayout
from server.pool import PagePool


@dataclass(frozen=True)
class ModuleSpec:
    rank: int
    scale: float
    in_features: int
    out_features: int
    dora: bool = False  # one more matrix: the DoRA scale, one row of out_features
    a_transposed: bool = False  # embed_tokens: A stored as in_features rows of rank
    replace: bool = False  # a full copy of the module (its output replaces the base's)

    @property
    def matrices(self) -> tuple[tuple[int, int], ...]:
        """``(rows, row length)`` of each matrix as written: A (or A.T), B^T, and DoRA's scale."""
        a = (self.in_features, self.rank) if self.a_transposed else (self.rank, self.in_features)
        return (a, (self.rank, self.out_features), *(((1, self.out_features),) if self.dora else ()))


@dataclass(frozen=True)
class AdapterSpec:
    """The shape of an adapter's weights (no tensors): what residency needs to place it.
    ``dtype``: the storage dtype of its pages (None: the model's)."""

    uid: int
    name: str
    modules: dict[tuple[int, str], ModuleSpec]
    dtype: str | None = None
    _packings: dict[PageLayout, AdapterPacking] = field(default_factory=dict, compare=False, repr=False)

    def packing(self, layout: PageLayout) -> AdapterPacking:
        """Where its rows go (server/adapter_packing.py); computed once per layout."""
        hit = self._packings.get(layout)
        if hit is None:
            itemsize = STORAGE_ITEMSIZE[self.dtype] if self.dtype else None
            hit = self._packings[layout] = _pack(tuple(self.modules.items()), layout, itemsize)
        return hit

    def pages_needed(self, layout: PageLayout) -> int:
        return self.packing(layout).num_pages

    def vocab(self, base: int) -> int:
        """Token ids its requests may use: more than the base's ``base`` if its embedding is a full
        copy with added tokens (embed_tokens is keyed ``(0, "embed_tokens")``)."""
        embed = self.modules.get((0, "embed_tokens"))
        return max(base, embed.in_features) if embed is not None else base


@functools.lru_cache(maxsize=64)
def _pack(modules: tuple[tuple[tuple[int, str], ModuleSpec], ...], layout: PageLayout,
          itemsize: int | None) -> AdapterPacking:
    """``pack``, shared by adapters of one shape (a family's adapters of one rank): the packing of
    a q,k,v,o adapter was ~0.5 ms of each load. Keyed by every module's whole spec."""
    return pack(dict(modules), layout, itemsize)


class AdapterResidency:
    def __init__(self, pool: PagePool, layout: PageLayout) -> None:
        self.pool = pool
        self.layout = layout
        self._resident: OrderedDict[int, AdapterPageTable] = OrderedDict()  # least recently pinned first
        self._pins: dict[int, int] = {}
        self._evicted: list[int] = []
        self.loads_total = 0
        self.evictions_total = 0
        pool.set_reclaimer("adapter", self._forget)

    def is_resident(self, uid: int) -> bool:
        return uid in self._resident

    def page_table(self, uid: int) -> AdapterPageTable:
        return self._resident[uid]

    def resident_uids(self) -> list[int]:
        """Least recently used first."""
        return list(self._resident)

    def pins(self, uid: int) -> int:
        return self._pins.get(uid, 0)

    def pin(self, uid: int) -> None:
        if uid not in self._pins:
            self.pool.unpark("adapter", uid)
        self._pins[uid] = self._pins.get(uid, 0) + 1
        self._resident.move_to_end(uid)

    def unpin(self, uid: int) -> None:
        left = self._pins[uid] - 1
        if left:
            self._pins[uid] = left
        else:
            del self._pins[uid]
            self._park(uid)

    def make_room(self, pages: int) -> bool:
        """Whether ``pages`` pages can be allocated now, evicting parked units (idle adapters,
        unreferenced cached KV blocks) as the pool needs. Evicts nothing itself."""
        return self.pool.can_allocate(pages)

    def load(self, spec: AdapterSpec) -> AdapterPageTable:
        """Give ``spec`` pages (evicting parked units if needed) and record it as resident, unpinned.

        Raises AdapterTooLarge if it needs more pages than the whole pool, and OutOfPages (from
        the pool) if pinned adapters and KV blocks leave too little room; the caller then waits.
        """
        packing = spec.packing(self.layout)
        need = packing.num_pages
        if need > self.pool.num_pages:
            raise AdapterTooLarge(
                f"adapter {spec.name!r} needs {need} pages; the pool has {self.pool.num_pages}"
            )
        table = packing.place(spec.uid, spec.modules, self.pool.allocate(need, "adapter"), spec.dtype)
        self._resident[spec.uid] = table
        self._park(spec.uid)
        self.loads_total += 1
        return table

    def evict(self, uid: int) -> None:
        """Drop an idle adapter (e.g. deleted by the user). Pinned adapters can't be evicted."""
        if uid in self._pins:
            raise ValueError(f"adapter uid {uid} is pinned by {self._pins[uid]} requests")
        if uid in self._resident:
            self.pool.unpark("adapter", uid)
            self.pool.free(self._resident[uid].all_pages())
            self._forget(uid)

    def _park(self, uid: int) -> None:
        self.pool.park("adapter", uid, tuple(self._resident[uid].all_pages()))

    def _forget(self, uid: object) -> None:
        """The adapter's pages were freed (reclaimed by the pool, or evicted here)."""
        assert isinstance(uid, int)
        del self._resident[uid]
        self._evicted.append(uid)
        self.evictions_total += 1

    def drain_evicted(self) -> list[int]:
        out, self._evicted = self._evicted, []
        return out
