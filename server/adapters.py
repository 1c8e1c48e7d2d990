"""The adapter registry: names to unique ids, and the disk -> host tiers.

Identity is separate from name (as SGLang's LoRARef): every add gets a fresh ``uid``, so deleting
and re-adding a name never aliases the old weights in the host cache or the pool. Each entry
counts its in-flight requests; a deleted adapter's weights stay available to the requests that
were already admitted and are dropped when the last one ends.

Threads: the API thread adds/removes/resolves; the engine thread asks ``spec_if_ready`` and
``host_weights``; one background thread reads adapters from disk into the host cache. A lock
guards the registry maps.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapter_store.host_cache import HostCache
from adapter_store.peft_format import LoraWeights, ParsedAdapter, load_peft_adapter
from adapter_store.store import AdapterStore, StoredAdapterMeta
from server.adapter_residency import AdapterSpec, ModuleSpec
from server.errors import AdapterTooLarge, UnknownAdapter
from server.model_config import ModelConfig
from server.page_layout import PageLayout

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AdapterRef:
    adapter_id: str
    uid: int
    path: Path
    meta: StoredAdapterMeta
    in_flight: int = 0
    requests_served: int = 0
    deleted: bool = False
    held: ParsedAdapter | None = None  # kept in memory while a deleted adapter still has requests
    spec: AdapterSpec | None = None
    failed: Exception | None = field(default=None, repr=False)


class AdapterManager:
    def __init__(self, store: AdapterStore, model: ModelConfig, layout: PageLayout, num_pages: int,
                 host_cache_bytes: int, max_rank: int, dtype: torch.dtype) -> None:
        self.store = store
        self.model = model
        self.layout = layout
        self.num_pages = num_pages
        self.max_rank = max_rank
        self.dtype = dtype
        self.host = HostCache[ParsedAdapter](host_cache_bytes)
        self._lock = threading.Lock()
        self._uids = itertools.count(1)
        self._by_name: dict[str, AdapterRef] = {}
        self._by_uid: dict[int, AdapterRef] = {}
        self._loading: dict[int, Future[None]] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader")
        # Called (on the loader thread) when an adapter reaches host memory, so an engine loop
        # that is idling on requests waiting for it can wake at once.
        self.on_loaded: Callable[[], None] = lambda: None
        self.retired: list[int] = []  # uids whose last request ended after deletion; engine drains
        self._host_load_seconds: list[float] = []  # appended by the loader thread, drained by metrics
        for meta in store.list():
            self._register(meta)

    def _register(self, meta: StoredAdapterMeta) -> AdapterRef:
        ref = AdapterRef(meta.adapter_id, next(self._uids), self.store.get_path(meta.adapter_id), meta)
        self._by_name[ref.adapter_id] = ref
        self._by_uid[ref.uid] = ref
        return ref

    # ---- API side -------------------------------------------------------------------------
    def add(self, adapter_id: str, source: Mapping[str, bytes] | Path, replace: bool = False) -> AdapterRef:
        """Validate against the base model and the pool, store atomically, register with a new uid."""
        parsed: list[ParsedAdapter] = []

        def validate(staged: Path) -> None:
            p = load_peft_adapter(staged, self.model, self.max_rank, self.dtype)
            need = self._spec(0, adapter_id, p).pages_needed(self.layout)
            if need > self.num_pages:
                raise AdapterTooLarge(
                    f"adapter {adapter_id!r} needs {need} pages of the pool; the pool has {self.num_pages}"
                )
            parsed.append(p)

        meta = self.store.put(adapter_id, source, replace=replace, validate=validate)
        with self._lock:
            old = self._by_name.get(adapter_id)
            if old is not None:
                self._retire(old)
            ref = self._register(meta)
            ref.spec = self._spec(ref.uid, adapter_id, parsed[0])
        self.host.put(ref.uid, parsed[0])
        return ref

    def remove(self, adapter_id: str) -> None:
        """New requests get 404 at once; requests already admitted finish on the old weights."""
        with self._lock:
            ref = self.resolve(adapter_id)
            if ref.in_flight and ref.held is None:
                ref.held = self.host.get(ref.uid) or self._read(ref)
            del self._by_name[adapter_id]
            self._retire(ref)
        self.store.delete(adapter_id)

    def _retire(self, ref: AdapterRef) -> None:
        ref.deleted = True
        if ref.in_flight == 0:
            self._drop(ref)

    def _drop(self, ref: AdapterRef) -> None:
        self._by_uid.pop(ref.uid, None)
        self.host.pop(ref.uid)
        ref.held = None
        self.retired.append(ref.uid)

    def resolve(self, adapter_id: str) -> AdapterRef:
        ref = self._by_name.get(adapter_id)
        if ref is None:
            raise UnknownAdapter(adapter_id, known=list(self._by_name))
        return ref

    def acquire(self, adapter_id: str) -> AdapterRef:
        with self._lock:
            ref = self.resolve(adapter_id)
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

    def list(self) -> list[AdapterRef]:
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
        """The adapter's shape if its weights are in host memory; else start reading it from disk."""
        ref = self._by_uid.get(uid)
        if ref is None:
            return None
        if ref.spec is not None and (ref.held is not None or uid in self.host):
            return ref.spec
        if uid not in self._loading and ref.failed is None:
            self._loading[uid] = self._loader.submit(self._load_into_host, ref)
        return None

    def host_weights(self, uid: int) -> Mapping[tuple[int, str], LoraWeights]:
        """Weights to copy into pages; read synchronously if the host cache dropped them meanwhile."""
        ref = self._by_uid[uid]
        parsed = ref.held or self.host.get(uid) or self._read(ref)
        return parsed.weights

    def failed(self, uid: int) -> Exception | None:
        ref = self._by_uid.get(uid)
        return None if ref is None else ref.failed

    def _load_into_host(self, ref: AdapterRef) -> None:
        try:
            start = time.perf_counter()
            parsed = self._read(ref)
            ref.spec = self._spec(ref.uid, ref.adapter_id, parsed)
            self.host.put(ref.uid, parsed)
            with self._lock:
                self._host_load_seconds.append(time.perf_counter() - start)
        except Exception as exc:  # surfaced to the adapter's waiting requests by the engine
            log.exception("loading adapter %s failed", ref.adapter_id, extra={"adapter_id": ref.adapter_id})
            ref.failed = exc
        finally:
            self._loading.pop(ref.uid, None)
            self.on_loaded()

    def _read(self, ref: AdapterRef) -> ParsedAdapter:
        return load_peft_adapter(ref.path, self.model, self.max_rank, self.dtype)

    def _spec(self, uid: int, name: str, parsed: ParsedAdapter) -> AdapterSpec:
        shapes = self.model.linear_shapes()
        return AdapterSpec(uid=uid, name=name, modules={
            key: ModuleSpec(w.rank, w.scale, *shapes[key[1]]) for key, w in parsed.weights.items()
        })

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
