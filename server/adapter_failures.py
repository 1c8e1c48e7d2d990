"""Failed adapter loads: why, what the adapter's requests are told, and when to try again. Plain Python.

A load that fails (file gone, disk error, corrupted bytes, an adapter too large for this server)
fails the requests waiting for it at once, and new requests for it fail fast while the failure is
fresh; after a backoff (1 s, doubling to 60 s on repeated failures) the next request tries again,
so a transient disk error, a restored file or a repaired version heals by itself, without a
restart and without a failing adapter re-reading the disk on every step. A failure that can't
heal on this server (too large for it) is not retried for this registration; a re-upload makes a
new registration, which starts clean.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass

from adapter_store.integrity import IntegrityError
from server.errors import AdapterCorrupt, AdapterTooLargeHere, AdapterUnavailable, InvalidAdapter

BACKOFF_FIRST = 1.0  # seconds
BACKOFF_MAX = 60.0
REASONS = ("corrupt", "missing", "io", "invalid", "too_large", "error")


class TooLargeHere(Exception):
    """An adapter needs more host memory or pool pages than this server has (the message says which)."""


@dataclass(frozen=True)
class LoadFailure:
    reason: str  # one of REASONS: the metric label
    error: AdapterUnavailable  # what the adapter's requests get (names the stored id)
    retry_at: float  # clock time after which a request may try again; inf: never
    attempts: int  # consecutive failed loads

    def current(self, now: float) -> bool:
        return now < self.retry_at


def classify(exc: BaseException) -> str:
    if isinstance(exc, IntegrityError):
        return "corrupt"
    if isinstance(exc, TooLargeHere):
        return "too_large"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, OSError):
        return "io"
    if isinstance(exc, (InvalidAdapter, ValueError)):
        return "invalid"  # stored by a replica with other limits, or a store file rewritten by hand
    return "error"


def failure_after(exc: BaseException, adapter_id: str, previous: LoadFailure | None,
                  now: float) -> LoadFailure:
    """The failure state after a failed load attempt (``previous``: the one before it, if any)."""
    reason = classify(exc)
    attempts = previous.attempts + 1 if previous is not None else 1
    if reason == "too_large":
        return LoadFailure(reason, AdapterTooLargeHere(adapter_id, f"cannot be served by this server: {exc}",
                                                       retry_after=60), math.inf, attempts)
    backoff = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempts - 1))
    error_type = AdapterCorrupt if reason == "corrupt" else AdapterUnavailable
    error = error_type(adapter_id, retry_after=math.ceil(backoff))
    return LoadFailure(reason, error, now + backoff, attempts)


class FailureCounts:
    """Failed loads by reason since start (``lora_server_adapter_load_failures_total``); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {reason: self._counts[reason] for reason in REASONS}
