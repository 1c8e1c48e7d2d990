"""Per-tenant limits: concurrent inference requests, and stored adapters and bytes.

``RequestGate`` counts a tenant's HTTP inference requests from admission until the response has
been sent (or the client left); one over the limit is a 429 with Retry-After. ``StorageQuota``
reserves an upload's adapter and bytes before it is stored, so two concurrent uploads of one
tenant can't both slip under the quota. Both are plain bookkeeping, used from the event loop and
the thread pool alike, hence the locks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from adapter_store.tenancy import tenant_of
from server.api.tenants import Principal
from server.engine_types import AdapterInfo
from server.errors import QuotaExceeded, TooManyRequests


class RequestGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}

    def enter(self, principal: Principal) -> Callable[[], None]:
        """Admit one request of ``principal``'s tenant or raise TooManyRequests; returns the release
        function (safe to call more than once)."""
        tenant, limit = principal.tenant, principal.limits.max_concurrent_requests
        if tenant is None:
            return lambda: None
        with self._lock:
            now = self._in_flight.get(tenant, 0)
            if limit is not None and now >= limit:
                raise TooManyRequests(f"tenant {tenant!r} already has {now} requests in flight (its limit "
                                      f"max_concurrent_requests is {limit}); retry when one finishes",
                                      retry_after=1)
            self._in_flight[tenant] = now + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._in_flight[tenant] -= 1

        return release

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._in_flight)


class StorageQuota:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[str, int]] = {}  # reservation token -> (stored id, bytes)
        self._next = 0

    @contextmanager
    def reserve(self, principal: Principal, stored_id: str, size: int,
                stored: Callable[[], Sequence[AdapterInfo]]) -> Iterator[None]:
        """Hold room for ``stored_id`` of ``size`` bytes while it is being stored, or raise
        QuotaExceeded. A replacement counts only its growth. ``stored()`` lists what is stored."""
        tenant, limits = tenant_of(stored_id), principal.limits
        if tenant is None or (limits.max_adapters is None and limits.max_adapter_bytes is None):
            yield
            return
        with self._lock:
            mine = {a.adapter_id: a.size_bytes for a in stored() if tenant_of(a.adapter_id) == tenant}
            for sid, nbytes in self._pending.values():
                if tenant_of(sid) == tenant:
                    mine[sid] = max(mine.get(sid, 0), nbytes)
            _check(tenant, principal, mine, stored_id, size)
            token = str(self._next)
            self._next += 1
            self._pending[token] = (stored_id, size)
        try:
            yield
        finally:
            with self._lock:
                del self._pending[token]


def _check(tenant: str, principal: Principal, mine: dict[str, int], stored_id: str, size: int) -> None:
    limits = principal.limits
    count = len(mine) + (stored_id not in mine)
    if limits.max_adapters is not None and count > limits.max_adapters:
        raise QuotaExceeded(f"tenant {tenant!r} may store at most {limits.max_adapters} adapters "
                            f"(max_adapters) and has {len(mine)}; delete one first", param="adapter_id")
    total = sum(mine.values()) - mine.get(stored_id, 0) + size
    if limits.max_adapter_bytes is not None and total > limits.max_adapter_bytes:
        raise QuotaExceeded(f"this upload of {size} bytes would bring tenant {tenant!r} to {total} stored "
                            f"bytes, over its limit of {limits.max_adapter_bytes} (max_adapter_bytes)",
                            param="file")
