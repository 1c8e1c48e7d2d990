"""The store watcher: a background thread that keeps this process in step with the shared store.

Every ``interval`` seconds it rescans the refs (``AdapterManager.sync``: one directory listing and a
stat per ref, so it works on NFS, where inotify sees nothing another host does; skipped while the
refs directory's own stamp is unchanged, with a full listing at least every few seconds), renews this
process's lease on the versions it may still read, and every ``gc_interval`` seconds runs a
garbage-collection pass (adapter_store/gc.py). Requests never wait for it: ``resolve`` checks an
id's ref itself. What the rescan adds is the rest: ids nobody asked about (listing, metrics), and
letting go of replaced or deleted registrations so their host memory and pool pages are freed.
"""

from __future__ import annotations

import logging
import threading
import time

from adapter_store.gc import GarbageCollector, Lease
from server import openmp
from server.adapters import AdapterManager

log = logging.getLogger(__name__)

GC_INTERVAL = 30.0


class StoreWatcher:
    def __init__(self, adapters: AdapterManager, interval: float, gc_interval: float = GC_INTERVAL) -> None:
        self.adapters = adapters
        self.interval = interval
        self.gc_interval = gc_interval
        self.lease = Lease(adapters.store)
        self.gc = GarbageCollector(adapters.store)
        self._next_gc = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-watcher", daemon=True)

    def start(self) -> None:
        self.tick()  # the lease exists before the first request is admitted
        self._thread.start()

    def tick(self) -> None:
        self.adapters.sync(full=False)
        self.lease.renew(self.adapters.versions_in_use())
        if time.monotonic() >= self._next_gc:
            self._next_gc = time.monotonic() + self.gc_interval
            self.gc.collect()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.lease.release()

    def _run(self) -> None:
        openmp.single_threaded()  # only the engine's thread keeps an OpenMP team
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # a flaky volume must not stop the watching; the next tick retries
                log.exception("adapter store rescan failed")
