"""The engine: one step is ``schedule() -> runner.execute() -> scheduler.update()``.

``LLMEngine`` is synchronous and single-threaded (tests and benchmarks drive it directly);
``AsyncEngine`` (server/async_engine.py) runs it on a thread for the HTTP server.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from adapter_store.store import AdapterStore
from kernels.backend import select_backend
from server.adapter_info import describe
from server.adapter_storage import AdapterStorage
from server.adapters import AdapterManager, AdapterRef
from server.config import EngineConfig
from server.engine_types import (
    AdapterInfo,
    EngineStats,
    PrefixCacheInfo,
    RequestOutput,
    StepInfo,
    TokenLogprob,
)
from server.errors import AdapterUnavailable, ContextLengthExceeded, InvalidRequest
from server.evictor import CostMeter
from server.hardware import device_for, pool_budget_for, resolve_dtype
from server.loader import load_model
from server.page_layout import PageLayout
from server.pool import PagePool
from server.request import Request
from server.runner import ModelRunner, RowContext, Sampled
from server.sampling import make_generator
from server.sampling_params import SamplingParams
from server.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from server.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PreparedRequest:
    """Per-request state the scheduler doesn't need: detokenizer, RNG, banned ids."""

    request: Request
    detok: IncrementalDetokenizer
    row: RowContext


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = device_for(config.device)
        dtype = resolve_dtype(config.dtype, device)
        loaded = load_model(config.model, dtype, device)
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = _model_name(loaded.source)
        limit = mc.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.layout = PageLayout.for_model(mc, config.block_size, dtype.itemsize)
        page_bytes = self.layout.page_bytes
        budget, sized_by = pool_budget_for(config, device)
        num_pages = budget // page_bytes
        if num_pages < mc.num_layers:
            raise ValueError(f"a pool of {budget} bytes ({sized_by}) holds {num_pages} pages; "
                             f"need at least {mc.num_layers}")
        self.pool = PagePool(num_pages)
        backend = select_backend(device, config.kernel_backend, dtype)
        self.runner = ModelRunner(mc, loaded.weights, self.layout, num_pages, backend, self.max_model_len,
                                  seed=config.seed, lora_backend=config.lora_backend,
                                  prepack=config.prepack_weights)
        store = AdapterStore(Path(config.adapter_store_dir))
        storage = AdapterStorage(config.adapter_dtype, dtype, self.runner.lora.storage_dtypes)
        self.adapters = AdapterManager(store, mc, self.layout, num_pages, config.host_cache_bytes,
                                       config.max_lora_rank, dtype, self.runner.model.base, storage)
        sched_cfg = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                    config.max_adapters_per_step, config.enable_prefix_caching,
                                    config.cold_start_wait)
        self.scheduler = Scheduler(sched_cfg, self.pool, self.layout, self.adapters)
        self._costs = CostMeter(self.pool.parked, self.layout.block_size, self.layout.num_layers)
        self._live: dict[str, PreparedRequest] = {}
        self._device_load_seconds: list[float] = []  # host -> pool copies; drained by metrics
        self.last_step: StepInfo | None = None
        log.info("engine ready: model=%s dtype=%s device=%s backend=%s lora=%s pool=%d pages x %d bytes "
                 "(%.1f MiB: %s; block_size=%d, page_elems=%d) max_model_len=%d adapters_on_disk=%d "
                 "prefix_caching=%s adapter_dtype=%s",
                 self.model_name, str(dtype).removeprefix("torch."), device, backend.name,
                 self.runner.lora.name, num_pages, page_bytes, num_pages * page_bytes / 2**20, sized_by,
                 self.layout.block_size, self.layout.page_elems, self.max_model_len,
                 len(self.adapters.list()), config.enable_prefix_caching, config.adapter_dtype)

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    adapter_id: str | None = None, request_id: str | None = None) -> str:
        """Validate and queue a request. Raises InvalidRequest, ContextLengthExceeded, UnknownAdapter."""
        live = self.prepare_request(prompt_token_ids, params, adapter_id, request_id)
        self.submit(live)
        return live.request.request_id

    def prepare_request(self, prompt_token_ids: list[int], params: SamplingParams,
                        adapter_id: str | None = None, request_id: str | None = None) -> PreparedRequest:
        """Everything that can fail, without touching the scheduler: safe on any thread."""
        request_id = request_id or uuid.uuid4().hex
        spec = self.adapters.resolve(adapter_id).spec if adapter_id is not None else None
        self._validate(prompt_token_ids, params, spec.vocab(self.model_config.vocab_size) if spec else None)
        tokenizer = self.tokenizer_for(adapter_id)
        ref = self.adapters.acquire(adapter_id) if adapter_id is not None else None
        if ref is not None and (error := self.adapters.failed(ref.uid)) is not None:
            self.adapters.release(ref.uid)  # its last load failed moments ago: fail fast, retry later
            raise error
        if ref is not None and not self.scheduler.residency.is_resident(ref.uid):
            self.adapters.prefetch(ref.uid)  # the disk read starts now, not at the first schedule
        req = Request(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), params=params,
            arrival=self.scheduler.next_arrival(),
            adapter_uid=ref.uid if ref else None, adapter_name=adapter_id,
            eos_token_ids=tokenizer.eos_token_ids, max_total_tokens=self.max_model_len,
        )
        banned = tuple(tokenizer.eos_token_ids) + params.stop_token_ids if params.min_tokens else ()
        row = RowContext(params, make_generator(params.seed, self.runner.device), banned)
        return PreparedRequest(req, IncrementalDetokenizer(tokenizer, stop=params.stop), row)

    def tokenizer_for(self, adapter_id: str | None) -> Tokenizer:
        """The tokenizer of a request on ``adapter_id``: the one saved with the adapter (added tokens,
        its chat template), else the base model's."""
        if adapter_id is None:
            return self.tokenizer
        return self.adapters.tokenizer(self.adapters.resolve(adapter_id)) or self.tokenizer

    def submit(self, live: PreparedRequest) -> None:
        """Queue a prepared request (engine thread)."""
        if live.request.request_id in self._live:
            if live.request.adapter_uid is not None:
                self.adapters.release(live.request.adapter_uid)
            raise InvalidRequest(f"request id {live.request.request_id!r} is already in use",
                                 param="request_id")
        self._live[live.request.request_id] = live
        self.scheduler.add(live.request)

    def _validate(self, prompt: list[int], params: SamplingParams, vocab: int | None) -> None:
        """``vocab``: the adapter's vocabulary (added tokens), None for the base model's."""
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        vocab = vocab or self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            # Name the field to shorten: the prompt when it alone leaves no room for one token.
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{len(prompt)} prompt tokens + max_tokens {params.max_tokens} = {total}",
                param="prompt" if len(prompt) >= self.max_model_len else "max_tokens",
            )
        if self.scheduler.kv.pages_for_tokens(total) > self.pool.num_pages:
            raise InvalidRequest(
                f"prompt + max_tokens ({total} tokens) needs more KV pages than the whole pool has "
                f"({self.pool.num_pages}); lower max_tokens or raise pool_bytes", param="max_tokens")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its pages."""
        req = self.scheduler.finish(request_id, "abort")
        if req is None:
            return None
        return self._close(self._live[request_id], "", ())

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._release_retired()
        outputs = self._fail_unloadable()
        out = self.scheduler.schedule()
        unreadable = self._write_adapters(out)
        if unreadable:
            outputs += self._drop_unwritten(out, unreadable)
        start = time.perf_counter()
        try:
            sampled = self.runner.execute(out, self.scheduler.residency.page_table, self._row)
        except BaseException:
            # Blocks registered for this step may never have been written: cache none of them.
            self.scheduler.cache.clear()
            raise
        seconds = time.perf_counter() - start
        self._costs.step(seconds, out.num_tokens)
        self.last_step = self._step_info(out, seconds)
        touched = self.scheduler.update(out, {rid: s.token_id for rid, s in sampled.items()})
        for req in touched:
            outputs.append(self._emit(self._live[req.request_id], sampled[req.request_id]))
        return outputs

    def _step_info(self, out: SchedulerOutput, seconds: float) -> StepInfo:
        uids = {c.adapter_uid for c in out.chunks if c.adapter_uid is not None}
        table = self.scheduler.residency.page_table
        item = self.layout.itemsize
        return StepInfo(out.num_tokens, sum(len(c.token_ids) == 1 for c in out.chunks),
                        sum(c.sample for c in out.chunks), len(self.scheduler.running), len(uids),
                        sum(table(u).weight_bytes(item) for u in uids), seconds)

    def _row(self, request_id: str) -> RowContext:
        return self._live[request_id].row

    def _emit(self, live: PreparedRequest, s: Sampled) -> RequestOutput:
        req = live.request
        text = live.detok.add(s.token_id)
        lp = ()
        if s.logprobs is not None:
            lp = (TokenLogprob(s.logprobs.token_id, s.logprobs.logprob, tuple(s.logprobs.top)),)
        if live.detok.stopped and req.finish_reason is None:
            self.scheduler.finish(req.request_id, "stop")
        if req.finish_reason is None:
            return RequestOutput(req.request_id, (s.token_id,), text, False, None,
                                 len(req.prompt_token_ids), len(req.output_token_ids), lp)
        return self._close(live, text + live.detok.flush(), (s.token_id,), lp)

    def _close(self, live: PreparedRequest, text: str, new_ids: tuple[int, ...],
               lp: tuple[TokenLogprob, ...] = ()) -> RequestOutput:
        req = live.request
        del self._live[req.request_id]
        if req.adapter_uid is not None:
            self.adapters.release(req.adapter_uid)
        return RequestOutput(req.request_id, new_ids, text, True, req.finish_reason,
                             len(req.prompt_token_ids), len(req.output_token_ids), lp)

    def _release_retired(self) -> None:
        """Deleted or replaced adapter versions whose last request ended: their pages and their
        cached KV blocks go at once (a replaced adapter's new uid never sees the old KV anyway)."""
        for uid in self.adapters.drain_retired():
            self.scheduler.cache.drop_adapter(uid)
            if self.scheduler.residency.is_resident(uid):
                self.scheduler.residency.evict(uid)
            self.runner.drop_adapter(uid)

    def _write_adapters(self, out: SchedulerOutput) -> dict[int, AdapterUnavailable]:
        """Copy the step's newly placed adapters into their pages; those whose weights could not be
        read (dropped from the host cache, then a disk error) -> the error for their requests."""
        unreadable = {}
        for table in out.adapter_loads:
            start = time.perf_counter()
            weights = self.adapters.host_weights(table.uid)
            if weights is None:
                unreadable[table.uid] = self.adapters.failed(table.uid) or AdapterUnavailable("")
                continue
            self.runner.write_adapter(table, weights)
            seconds = time.perf_counter() - start
            self._device_load_seconds.append(seconds)
            self._costs.adapter_copy(seconds, len(table.all_pages()))
        return unreadable

    def _drop_unwritten(self, out: SchedulerOutput,
                        errors: dict[int, AdapterUnavailable]) -> list[RequestOutput]:
        """Take adapters whose pages were never written out of the step: their chunks are not run,
        their requests end with the error, their pages and the KV blocks registered under them go
        back. Every other request of the step runs as scheduled."""
        out.chunks = [c for c in out.chunks if c.adapter_uid not in errors]
        outs = self._fail_requests(errors)
        for uid in errors:
            self.scheduler.cache.drop_adapter(uid)
            if self.scheduler.residency.is_resident(uid):
                self.scheduler.residency.evict(uid)
            self.runner.drop_adapter(uid)
        return outs

    def _fail_unloadable(self) -> list[RequestOutput]:
        """End the requests waiting for an adapter whose load failed (since the last step, or still
        within its retry backoff), with the error saying why; nothing else waits on them."""
        errors = self.adapters.take_failures()
        for req in self.scheduler.waiting:
            uid = req.adapter_uid
            if uid is not None and uid not in errors and (error := self.adapters.failed(uid)) is not None:
                errors[uid] = error
        return self._fail_requests(errors) if errors else []

    def _fail_requests(self, errors: dict[int, AdapterUnavailable]) -> list[RequestOutput]:
        outs = []
        for req in [*self.scheduler.running, *self.scheduler.waiting]:
            error = errors.get(req.adapter_uid) if req.adapter_uid is not None else None
            if error is None:
                continue
            log.error("failing request: its adapter could not be loaded (%s)", error.code,
                      extra={"request_id": req.request_id, "adapter_id": req.adapter_name})
            out = self.abort(req.request_id)
            if out is not None:
                outs.append(dataclasses.replace(out, error=error.for_id(req.adapter_name or "")))
        return outs

    # ---- adapters and stats -------------------------------------------------------------
    def add_adapter(self, adapter_id: str, source: Path | dict[str, bytes],
                    replace: bool = False) -> AdapterInfo:
        return self.adapter_info(self.adapters.add(adapter_id, source, replace=replace))

    def remove_adapter(self, adapter_id: str) -> None:
        self.adapters.remove(adapter_id)

    def list_adapters(self) -> list[AdapterInfo]:
        """Every adapter in the store now, including those uploaded through other replicas."""
        return [self.adapter_info(r) for r in self.adapters.list(sync=True)]

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        return self.adapter_info(self.adapters.resolve(adapter_id))

    def adapter_info(self, ref: AdapterRef) -> AdapterInfo:
        return describe(ref, self.scheduler.residency.is_resident(ref.uid), ref.uid in self.adapters.host,
                         self.layout, self.runner.arena.element_size(), self.model_config.vocab_size)

    def drain_load_times(self) -> list[tuple[str, float]]:
        """(tier, seconds) of adapter loads since the last call: "host" = disk -> host memory,
        "device" = host memory -> pool pages."""
        device, self._device_load_seconds = self._device_load_seconds, []
        host = self.adapters.drain_host_load_seconds()
        return [("host", t) for t in host] + [("device", t) for t in device]

    def stats(self) -> EngineStats:
        sched, res, cache = self.scheduler, self.scheduler.residency, self.scheduler.cache
        evictions = self.pool.parked.evictions
        names = {r.uid: r.adapter_id for r in self.adapters.list()}
        return EngineStats(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            pool_pages_total=self.pool.num_pages, pool_pages_free=self.pool.num_free,
            pool_pages_empty=self.pool.num_empty,
            pool_pages_kv=self.pool.used("kv"), pool_pages_adapter=self.pool.used("adapter"),
            pool_pages_cached=self.pool.used("cached"),
            page_bytes=self.layout.page_elems * self.runner.arena.element_size(),
            adapters_resident=len(res.resident_uids()), adapters_host=len(self.adapters.host.keys()),
            adapters_stored=len(names), adapter_loads_total=res.loads_total,
            adapter_evictions_total=res.evictions_total, host_cache_bytes=self.adapters.host.bytes_used,
            running_adapters=sorted({r.adapter_name for r in list(sched.running) if r.adapter_name}),
            waiting_adapters=sorted({r.adapter_name for r in list(sched.waiting) if r.adapter_name}),
            max_loras=self.config.max_adapters_per_step or self.config.max_num_seqs,
            preemptions_total=sched.preemptions_total,
            prefix_cache=PrefixCacheInfo(
                enabled=cache.enabled, queries=cache.stats.queries, hits=cache.stats.hits,
                preempted_queries=cache.stats.preempted_queries, preempted_hits=cache.stats.preempted_hits,
                blocks=cache.num_blocks, blocks_evictable=cache.num_parked_blocks,
                blocks_dropped=cache.stats.dropped_blocks),
            evictions={"kv_block": evictions["kv_block"], "adapter": evictions["adapter"]},
            adapter_load_failures=self.adapters.load_failures.snapshot(),
        )


_QUANT_SUFFIX = re.compile(r"[.-](Q\d[\w]*|IQ\d[\w]*|F16|BF16|F32)$", re.IGNORECASE)


def _model_name(source: str) -> str:
    """The id clients use for the base model: the dir or file name, without ``.gguf`` and a
    quantization suffix (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``)."""
    path = source.split(":", 1)[-1].rstrip("/")
    return _QUANT_SUFFIX.sub("", os.path.basename(path).removesuffix(".gguf"))
