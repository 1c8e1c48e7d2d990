"""The unified page pool's bookkeeping: a free list and reference counts. No torch.

The arena (a device tensor) is cut into ``num_pages`` equal pages; this class hands out their
ids. KV blocks and resident adapters draw from the same free list, which is what lets the split
between them follow the load. Each page is tagged with the kind that holds it so the split can be
reported. Freed pages go to the back of the free list (FIFO reuse), which keeps allocation order
deterministic and easy to test.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

PageKind = Literal["kv", "adapter"]


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
        self._used_by_kind: dict[PageKind, int] = {"kv": 0, "adapter": 0}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def used(self, kind: PageKind) -> int:
        return self._used_by_kind[kind]

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int, kind: PageKind = "kv") -> list[int]:
        """Take ``n`` pages (all or nothing), each with reference count 1."""
        if n > len(self._free):
            raise OutOfPages(n, len(self._free))
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
        """Drop one reference from each page; pages that reach zero return to the free list."""
        for p in pages:
            if self._refs[p] == 0:
                raise ValueError(f"page {p} is already free")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                kind = self._kind[p]
                assert kind is not None
                self._used_by_kind[kind] -= 1
                self._kind[p] = None
                self._free.append(p)

    def refcount(self, page: int) -> int:
        return self._refs[page]
