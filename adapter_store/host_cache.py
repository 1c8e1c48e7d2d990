"""Bytes-bounded LRU of parsed adapters in host memory (the tier between disk and device pages).

Keys are the engine's internal adapter uids, never names: a name deleted and re-uploaded gets a
new uid, so stale weights can't be served under the old name. Pure Python; the values merely hold
tensors (anything with an ``nbytes`` attribute will do).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

logger = logging.getLogger(__name__)


class HasNbytes(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=HasNbytes)


class HostCache(Generic[V]):
    """LRU cache bounded by the sum of its values' ``nbytes`` (``HostCache[ParsedAdapter]``).

    The lock exists because adapters are loaded from disk on a background thread while the
    engine thread reads; every public method takes it, and none does I/O while holding it.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, V] = OrderedDict()  # least recently used first
        self._sizes: dict[Hashable, int] = {}  # nbytes as of put: eviction math stays consistent
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, key: Hashable) -> V | None:
        """The cached value (now most recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> V:
        """Cache ``value`` as most recently used, evicting LRU entries until it fits.

        A value larger than ``max_bytes`` is not cached (an older entry under ``key`` is dropped)
        and nothing else is evicted for it; either way ``value`` is returned.
        """
        size = value.nbytes
        with self._lock:
            self._remove(key)
            if size > self.max_bytes:
                logger.info(
                    "%r (%d bytes) exceeds host cache budget %d; not cached", key, size, self.max_bytes
                )
                return value
            while self._bytes + size > self.max_bytes:
                old_key, _ = self._items.popitem(last=False)
                self._bytes -= self._sizes.pop(old_key)
                self.evictions += 1
                logger.debug("host cache evicted %r", old_key)
            self._items[key] = value
            self._sizes[key] = size
            self._bytes += size
            return value

    def pop(self, key: Hashable) -> V | None:
        """Remove and return the value for ``key`` (None if absent)."""
        with self._lock:
            return self._remove(key)

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._sizes.clear()
            self._bytes = 0

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._bytes

    def __contains__(self, key: object) -> bool:
        """Membership without touching recency."""
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _remove(self, key: Hashable) -> V | None:
        value = self._items.pop(key, None)
        if value is not None:
            self._bytes -= self._sizes.pop(key)
        return value
