"""The adapter registry: names to unique ids, kept in step with the shared store, and the disk ->
host tiers.

Identity is separate from name (as SGLang's LoRARef): every registration gets a fresh ``uid``, so a
replaced, or deleted and re-added, name never aliases old weights in the host cache or the pool. A
registration is bound to an immutable version directory of the store, never to the id's path: a
request admitted on it reads those bytes whatever happens to the id meanwhile. Each entry counts
its in-flight requests; a replaced or deleted entry stays (and its version stays leased, see
adapter_store/gc.py) until the last of them ends.

Several processes share one store. ``resolve`` stats the id's ref file (one ``stat``) and re-reads
it if it changed, so an upload, replace or delete made by another replica is seen by the next
request; ``sync`` (the watcher calls it a few times a second, and listing calls it) catches up on
every ref. Ref reads and writes are applied to the maps in the order they happened under
``_sync_lock``; ``_lock`` guards only the maps, so the engine thread never waits on file I/O.

Every read from disk first checks the version against its content address
(adapter_store/integrity.py): corrupted bytes are refused (AdapterCorrupt), never served. A failed
load fails only that adapter's requests and is retried after a backoff (server/adapter_failures.py).

Threads: API threads add/remove/resolve; the engine thread asks ``spec_if_ready`` and
``host_weights``; one background thread reads adapters from disk into the host cache; the store
watcher calls ``sync``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapter_store.host_cache import HostCache
from adapter_store.integrity import IntegrityError, read_version
from adapter_store.peft_format import WEIGHTS_NAME, LoraWeights, ParsedAdapter, load_peft_adapter
from adapter_store.refs import RefKey, StoredAdapterMeta, Tombstone, is_valid_adapter_id
from adapter_store.store import AdapterStore
from server import openmp
from server.adapter_failures import FailureCounts, LoadFailure, TooLargeHere, failure_after
from server.adapter_prep import prepare_for_base
from server.adapter_residency import AdapterSpec
from server.adapter_specs import spec_from_config, spec_from_parsed
from server.adapter_storage import AdapterStorage
from server.adapter_tokenizers import AdapterTokenizers
from server.dora import BaseWeights
from server.errors import AdapterTooLarge, AdapterUnavailable, UnknownAdapter
from server.model_config import ModelConfig
from server.page_layout import PageLayout
from server.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FULL_SCAN_SECONDS = 5.0  # longest a watcher tick relies on the refs directory's stamp alone
# Weights files up to this size are read once, whole, to be hashed and parsed (larger ones: hashed
# in chunks, then read tensor by tensor, so that memory holds one copy of them, not two).
SINGLE_READ_BYTES = 256 << 20


@dataclass(eq=False)
class AdapterRef:
    adapter_id: str
    uid: int
    path: Path  # the immutable version directory (store.version_path), never the id's ref
    meta: StoredAdapterMeta
    in_flight: int = 0
    requests_served: int = 0
    deleted: bool = False  # replaced or deleted: takes no new requests, dropped after its last one
    spec: AdapterSpec | None = None
    failure: LoadFailure | None = field(default=None, repr=False)  # the last load failed


class AdapterManager:
    def __init__(self, store: AdapterStore, model: ModelConfig, layout: PageLayout, num_pages: int,
                 host_cache_bytes: int, max_rank: int, dtype: torch.dtype, base: BaseWeights,
                 storage: AdapterStorage | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.storage = storage or AdapterStorage("model", dtype, (dtype,))
        self.model = model
        self.base = base  # DoRA's weight norms and the check of embedding copies (server/dora.py)
        self.layout = layout
        self.num_pages = num_pages
        self.max_rank = max_rank
        self.dtype = dtype
        self.host = HostCache[ParsedAdapter](host_cache_bytes)
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._uids = itertools.count(1)
        self._by_name: dict[str, AdapterRef] = {}
        self._by_uid: dict[int, AdapterRef] = {}
        self._seen: dict[str, RefKey] = {}  # every ref applied, live or tombstone -> stamp read
        # uids with a load queued or running; added before the submit, so a load that ends at once
        # can't leave its uid behind (which would block every later load of it)
        self._loading: set[int] = set()
        # single-threaded: only the engine's thread keeps an OpenMP team (server/openmp.py)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader",
                                          initializer=openmp.single_threaded)
        self.tokenizers = AdapterTokenizers(model)
        # Called (on the loader thread) when an adapter reaches host memory, so an engine loop
        # that is idling on requests waiting for it can wake at once.
        self.on_loaded: Callable[[], None] = lambda: None
        self.retired: list[int] = []  # uids whose last request ended after deletion; engine drains
        self._host_load_seconds: list[float] = []  # appended by the loader thread, drained by metrics
        self._clock = clock
        self.load_failures = FailureCounts()
        self._fresh_failures: dict[int, AdapterUnavailable] = {}  # failed since the engine last asked
        self._refs_key: RefKey | None = None  # the refs directory's stamp at the last listing
        self._listed_at = float("-inf")
        self.sync()

    # ---- keeping up with the shared store ---------------------------------------------------
    def sync(self, full: bool = True) -> None:
        """Apply every ref that changed since this process last read it (one listing, a stat each).
        ``full=False`` (the watcher's ticks): skip the listing while the refs directory's stamp is
        the one seen at the last listing and that listing is under FULL_SCAN_SECONDS old. With
        thousands of adapters a listing is thousands of stats: at 2 ticks a second it took ~14% of
        a 2-core server's samples. The periodic full listing covers what a directory stamp can
        miss (a second write within its timestamp granularity; NFS attribute caching)."""
        refs_key = self.store.refs_key()
        now = self._clock()
        if not full and refs_key == self._refs_key and now - self._listed_at < FULL_SCAN_SECONDS:
            return
        keys = self.store.scan()
        self._refs_key, self._listed_at = refs_key, now
        with self._lock:
            changed = [i for i, key in keys.items() if self._seen.get(i) != key]
            changed += [i for i in self._seen if i not in keys]
        for adapter_id in changed:
            self.refresh(adapter_id)

    def refresh(self, adapter_id: str) -> AdapterRef | None:
        """Re-read one ref and apply it; the id's registration afterwards (None: absent or deleted)."""
        with self._sync_lock:
            try:
                found = self.store.read(adapter_id)
            except (OSError, ValueError) as exc:
                log.warning("unreadable ref of adapter %s: %s", adapter_id, exc,
                            extra={"adapter_id": adapter_id})
                return self._by_name.get(adapter_id)
            return self._apply(adapter_id, *(found or (None, None)))

    def _apply(self, adapter_id: str, key: RefKey | None, record: StoredAdapterMeta | Tombstone | None,
               parsed: ParsedAdapter | None = None) -> AdapterRef | None:
        """Under ``_sync_lock`` (the only writer of ``_by_name``). A new registration gets its shape
        before it is visible: from ``parsed`` if the weights were just read, else from its config."""
        live = record if isinstance(record, StoredAdapterMeta) else None
        ref = None
        current = self._by_name.get(adapter_id)
        if live is not None and (current is None or current.meta != live):
            ref = AdapterRef(adapter_id, next(self._uids), self.store.version_path(live.version), live)
            # file reads (config, header) outside _lock: the engine thread never waits on them
            ref.spec = (self._spec(ref.uid, adapter_id, parsed) if parsed
                        else spec_from_config(ref.uid, adapter_id, ref.path, self.model))
        with self._lock:
            if key is None:
                self._seen.pop(adapter_id, None)
            else:
                self._seen[adapter_id] = key
            current = self._by_name.get(adapter_id)
            if current is not None and current.meta == live:
                return current
            if current is not None:
                del self._by_name[adapter_id]
                self._retire(current)
            if ref is None:
                return None
            self._by_name[adapter_id] = ref
            self._by_uid[ref.uid] = ref
            return ref

    def versions_in_use(self) -> set[str]:
        """Every version a registration here may still read: what this process's lease lists."""
        with self._lock:
            return {ref.meta.version for ref in self._by_uid.values()}

    # ---- API side -------------------------------------------------------------------------
    def add(self, adapter_id: str, source: Mapping[str, bytes] | Path, replace: bool = False) -> AdapterRef:
        """Validate against the base model and the pool, store atomically, register with a new uid."""
        with self.store.stage(adapter_id, source, replace=replace) as staged:
            parsed = self.parse(staged.path)
            spec = self._spec(0, adapter_id, parsed)
            self.tokenizers.check(staged.path, spec.vocab(self.model.vocab_size))
            too_large = self._too_large(parsed, spec)
            if too_large:
                raise AdapterTooLarge(f"adapter {adapter_id!r} {too_large}")
            with self._sync_lock:
                key, meta = self.store.commit(staged, replace=replace)
                ref = self._apply(adapter_id, key, meta, parsed)
                assert ref is not None
                self.host.put(ref.uid, parsed)
        return ref

    def remove(self, adapter_id: str) -> None:
        """Tombstone the adapter: new requests get 404 (here at once, in other replicas at their next
        look at the ref); requests already admitted finish on the version they were admitted with."""
        if not is_valid_adapter_id(adapter_id):
            raise UnknownAdapter(adapter_id, known=self.names())
        with self._sync_lock:
            try:
                key, tomb = self.store.delete(adapter_id)
            except UnknownAdapter:
                found = self.store.read(adapter_id)  # deleted elsewhere: catch up, then answer 404
                self._apply(adapter_id, *(found or (None, None)))
                raise
            self._apply(adapter_id, key, tomb)

    def _retire(self, ref: AdapterRef) -> None:
        ref.deleted = True
        if ref.in_flight == 0:
            self._drop(ref)

    def _drop(self, ref: AdapterRef) -> None:
        self._by_uid.pop(ref.uid, None)
        self.tokenizers.drop(ref.uid)
        self.host.pop(ref.uid)
        self.retired.append(ref.uid)

    def resolve(self, adapter_id: str) -> AdapterRef:
        """The id's current registration, or UnknownAdapter. One stat of its ref tells whether this
        process is up to date; if not, the ref is re-read first."""
        key = self.store.key(adapter_id) if is_valid_adapter_id(adapter_id) else None
        with self._lock:
            fresh = self._seen.get(adapter_id) == key
            ref = self._by_name.get(adapter_id)
        if not fresh:
            ref = self.refresh(adapter_id)
        if ref is None:
            raise UnknownAdapter(adapter_id, known=self.names())
        return ref

    def tokenizer(self, ref: AdapterRef) -> Tokenizer | None:
        """The tokenizer saved with the adapter, or None if it has none (server/adapter_tokenizers.py)."""
        return self.tokenizers.get(ref.uid, ref.adapter_id, ref.path)

    def acquire(self, adapter_id: str) -> AdapterRef:
        """Resolve and count a request in: the request is bound to this registration's version."""
        while True:
            ref = self.resolve(adapter_id)
            with self._lock:
                if not ref.deleted:  # else it was replaced since resolve: take the new one
                    ref.in_flight += 1
                    ref.requests_served += 1
                    return ref

    def release(self, uid: int) -> None:
        with self._lock:
            ref = self._by_uid.get(uid)
            if ref is None:
                return
            ref.in_flight -= 1
            if ref.deleted and ref.in_flight == 0:
                self._drop(ref)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def list(self, sync: bool = False) -> list[AdapterRef]:
        """Current registrations by id; ``sync`` first catches up with the store."""
        if sync:
            self.sync()
        with self._lock:
            return sorted(self._by_name.values(), key=lambda r: r.adapter_id)

    def drain_host_load_seconds(self) -> list[float]:
        """Durations of disk -> host loads since the last call."""
        with self._lock:
            out, self._host_load_seconds = self._host_load_seconds, []
            return out

    def drain_retired(self) -> list[int]:
        with self._lock:
            out, self.retired = self.retired, []
            return out

    # ---- engine side ----------------------------------------------------------------------
    def spec_if_ready(self, uid: int) -> AdapterSpec | None:
        """The adapter's shape if its weights are in host memory; else start reading it from disk
        (unless a failed load is still within its backoff)."""
        ref = self._by_uid.get(uid)
        if ref is None:
            return None
        if ref.spec is not None and uid in self.host:
            return ref.spec
        self.prefetch(uid)
        return None

    def prefetch(self, uid: int) -> None:
        """Start reading the adapter from disk into host memory unless it is there or on its way, or
        its last load failed within its backoff. Called when a request is admitted (any thread), so
        that a lone request's load starts then, not when the engine first schedules it. The uid is
        marked loading before the load is submitted (a load that finished first left a stale mark)."""
        with self._lock:
            ref = self._by_uid.get(uid)
            if ref is None or uid in self._loading:
                return
            if ref.failure is not None and ref.failure.current(self._clock()):
                return
            if ref.spec is not None and uid in self.host:
                return
            self._loading.add(uid)
            self._loader.submit(self._load_into_host, ref)

    def host_weights(self, uid: int) -> Mapping[tuple[int, str], LoraWeights] | None:
        """Weights to copy into pages; read synchronously if the host cache dropped them meanwhile.
        None if that read fails: the failure is recorded and the caller fails the adapter's requests."""
        ref = self._by_uid[uid]
        parsed = self.host.get(uid)
        if parsed is None:
            try:
                parsed = self._read(ref)
            except Exception as exc:  # noqa: BLE001 - any read failure fails this adapter only
                self._record_failure(ref, exc)
                return None
        return parsed.weights

    def failed(self, uid: int) -> AdapterUnavailable | None:
        """The error for the adapter's requests while its last load failure is fresh, else None."""
        ref = self._by_uid.get(uid)
        failure = None if ref is None else ref.failure
        return failure.error if failure is not None and failure.current(self._clock()) else None

    def take_failures(self) -> dict[int, AdapterUnavailable]:
        """Loads that failed since the last call (uid -> error): every request that was waiting for
        one fails, however long ago the failure happened (its backoff may be over already)."""
        with self._lock:
            out, self._fresh_failures = self._fresh_failures, {}
            return out

    def _load_into_host(self, ref: AdapterRef) -> None:
        try:
            start = time.perf_counter()
            parsed = self._read(ref)
            spec = self._spec(ref.uid, ref.adapter_id, parsed)
            too_large = self._too_large(parsed, spec)
            if too_large:
                raise TooLargeHere(too_large)
            ref.spec = spec
            self.host.put(ref.uid, parsed)
            ref.failure = None
            with self._lock:
                self._host_load_seconds.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - surfaced to the adapter's waiting requests by the engine
            self._record_failure(ref, exc)
        finally:
            with self._lock:
                self._loading.discard(ref.uid)
            self.on_loaded()

    def _record_failure(self, ref: AdapterRef, exc: Exception) -> None:
        ref.failure = failure = failure_after(exc, ref.adapter_id, ref.failure, self._clock())
        self.load_failures.add(failure.reason)
        with self._lock:
            self._fresh_failures[ref.uid] = failure.error
        fields = {"adapter_id": ref.adapter_id, "reason": failure.reason}
        if isinstance(exc, (IntegrityError, TooLargeHere, OSError)):  # the message says it all
            log.error("loading adapter %s failed (%s): %s", ref.adapter_id, failure.reason, exc, extra=fields)
        else:
            log.exception("loading adapter %s failed (%s)", ref.adapter_id, failure.reason, extra=fields)

    def _read(self, ref: AdapterRef) -> ParsedAdapter:
        """The version checked against its content address, then parsed from the very bytes hashed
        (read once; a weights file over SINGLE_READ_BYTES is hashed in chunks and read again)."""
        digests, data = read_version(ref.path, WEIGHTS_NAME, SINGLE_READ_BYTES)
        return self.parse(ref.path, checksum=digests[WEIGHTS_NAME], data=data)

    def _too_large(self, parsed: ParsedAdapter, spec: AdapterSpec) -> str | None:
        """Why this server can never hold the adapter (None: it can). Host memory must hold it whole:
        an adapter the host cache refuses would be read from disk again on every try to place it."""
        if parsed.nbytes > self.host.max_bytes:
            return (f"needs {parsed.nbytes} bytes of host memory, more than host_cache_bytes "
                    f"({self.host.max_bytes})")
        pages = spec.pages_needed(self.layout)
        if pages > self.num_pages:
            return f"needs {pages} pages of the pool; the pool has {self.num_pages}"
        return None

    def _spec(self, uid: int, name: str, parsed: ParsedAdapter) -> AdapterSpec:
        return spec_from_parsed(uid, name, parsed, self.storage.dtype_for(parsed))

    def parse(self, path: Path, checksum: str | None = None,
              data: bytearray | memoryview | None = None) -> ParsedAdapter:
        """Parse a PEFT dir and make it ready for this base model (DoRA scales computed). A plain
        adapter's bf16 factors stay bf16 on the host: the pool writer casts them if its pages aren't."""
        parsed = load_peft_adapter(path, self.model, self.max_rank, self.dtype, checksum=checksum, data=data,
                                   keep_bf16=True)
        return prepare_for_base(parsed, self.base)

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

