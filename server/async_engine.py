"""``AsyncEngine``: the step loop on its own thread, with an asyncio stream per request.

The engine thread owns the scheduler, the pool and the device; the event loop thread never
touches them. Requests and aborts cross over through an inbox drained at the top of each step,
so an abort frees its pages before the next step runs. Validation (unknown adapter, context
length, parameters) happens on the caller's thread so errors reach the HTTP client as 4xx
before any streaming starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from server import openmp
from server.adapter_watch import StoreWatcher
from server.config import EngineConfig
from server.engine import LLMEngine, PreparedRequest
from server.engine_types import AdapterInfo, EngineStats, RequestOutput
from server.errors import InvalidRequest, Overloaded
from server.sampling_params import SamplingParams

log = logging.getLogger(__name__)

STATS_LOG_SECONDS = 10.0  # how often a busy engine logs its load and pool usage
IDLE_WAIT_SECONDS = 0.01  # longest nap while requests wait on adapter loads (a load's end wakes it)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    """On the event loop: each output into its request's stream."""
    for stream, out in items:
        stream.queue.put_nowait(out)


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.engine.adapters.on_loaded = self._wake_up
        self.watcher = StoreWatcher(self.engine.adapters, config.store_rescan_interval)
        self.config = config
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = False
        self._draining = False
        self._lock = threading.Lock()  # guards _streams (event loop thread vs engine thread)
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)

    def _wake_up(self) -> None:
        self._wake.set()

    # the engine's read-only facts, for the API
    @property
    def tokenizer(self):  # noqa: ANN201 - server.tokenizer.Tokenizer
        return self.engine.tokenizer

    def tokenizer_for(self, adapter_id: str | None):  # noqa: ANN201 - server.tokenizer.Tokenizer
        return self.engine.tokenizer_for(adapter_id)

    @property
    def model_config(self):  # noqa: ANN201 - server.model_config.ModelConfig
        return self.engine.model_config

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._draining

    def start(self) -> None:
        self.watcher.start()
        # This thread loaded the model: its OpenMP workers go, so the engine thread's team is the only
        # one and keeps its spin between ops (server/openmp.py).
        openmp.release_team()
        self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop taking requests; with ``drain``, let in-flight ones finish first."""
        self._draining = True
        if drain:
            self._inbox.put(("drain",))
        else:
            self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.watcher.stop()
        self.engine.adapters.shutdown()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       adapter_id: str | None = None, request_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator early (client gone) aborts it."""
        request_id = request_id or uuid.uuid4().hex
        self._admit_check()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequest(f"request id {request_id!r} is already in use", param="request_id")
            live = self.engine.prepare_request(prompt_token_ids, params, adapter_id, request_id)
            self._streams[request_id] = stream
        self._inbox.put(("add", live))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._inbox.put(("abort", request_id))
                self._wake.set()

    def _admit_check(self) -> None:
        if self._draining or not self._thread.is_alive():
            raise Overloaded("the server is shutting down", retry_after=5)
        # Accepted streams not yet running: counts requests still in the inbox, unlike the
        # scheduler's own queue, so a burst can't overshoot the limit.
        waiting = len(self._streams) - len(self.engine.scheduler.running)
        if waiting >= self.config.max_waiting:
            raise Overloaded(f"{waiting} requests are waiting (limit {self.config.max_waiting}); retry later",
                             retry_after=1)

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # ---- adapters and stats (API thread; the adapter manager has its own lock) -------------
    def add_adapter(self, adapter_id: str, source: Path | dict[str, bytes],
                    replace: bool = False) -> AdapterInfo:
        return self.engine.add_adapter(adapter_id, source, replace)

    def remove_adapter(self, adapter_id: str) -> None:
        self.engine.remove_adapter(adapter_id)
        self._wake.set()

    def list_adapters(self) -> list[AdapterInfo]:
        return self.engine.list_adapters()

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        return self.engine.get_adapter(adapter_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def drain_load_times(self) -> list[tuple[str, float]]:
        return self.engine.drain_load_times()

    # ---- the engine thread ----------------------------------------------------------------
    def _loop(self) -> None:
        draining = False
        next_log = time.monotonic() + STATS_LOG_SECONDS
        while not self._stop:
            draining = self._drain_inbox() or draining
            busy = self.engine.has_work()
            if busy:
                self._deliver_all(self._step())
                if time.monotonic() >= next_log:
                    self._log_stats()
                    next_log = time.monotonic() + STATS_LOG_SECONDS
            elif draining:
                break
            if not busy or not self.engine.scheduler.running:
                # Idle, or every request waits (for an adapter being read from disk, or for pages):
                # stepping again at once would only spin and hold the GIL the loader thread needs.
                # New requests, aborts and finished adapter loads set the event.
                self._wake.wait(0.05 if not busy else IDLE_WAIT_SECONDS)
                self._wake.clear()
        log.info("engine loop stopped")
        with self._lock:
            left = list(self._streams)
        for request_id in left:  # stopped without draining: nobody else will end these streams
            self._fail(request_id, Overloaded("the server is shutting down", retry_after=5))

    def _log_stats(self) -> None:
        st = self.engine.stats()
        pc = st.prefix_cache
        log.info("running=%d waiting=%d pool: %d/%d pages free (kv %d, cached %d, adapters %d) "
                 "adapters resident=%d host=%d preemptions=%d prefix cache: %d blocks, %d/%d tokens hit",
                 st.num_running, st.num_waiting, st.pool_pages_free, st.pool_pages_total, st.pool_pages_kv,
                 st.pool_pages_cached, st.pool_pages_adapter, st.adapters_resident, st.adapters_host,
                 st.preemptions_total, pc.blocks, pc.hits, pc.queries)

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as exc:  # a bug must not take the server down: fail the running requests
            log.exception("engine step failed; aborting running requests")
            for rid in [r.request_id for r in self.engine.scheduler.running]:
                self.engine.abort(rid)
                self._fail(rid, exc)
            return []

    def _drain_inbox(self) -> bool:
        draining = False
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return draining
            if msg[0] == "add":
                self._submit(msg[1])
            elif msg[0] == "abort":
                out = self.engine.abort(msg[1])
                if out is not None:
                    self._deliver(out)
            elif msg[0] == "drain":
                draining = True

    def _submit(self, live: PreparedRequest) -> None:
        try:
            self.engine.submit(live)
        except Exception as exc:
            self._fail(live.request.request_id, exc)

    def _deliver_all(self, outs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one call: one wake-up of the loop per step
        instead of one per request (each is a write to the loop's self-pipe and a separate turn of
        its scheduler, on the cores the next step needs)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for out in outs:
            if out.error is not None:  # the engine ended it for a fault: the caller gets the error
                self._fail(out.request_id, out.error)
        with self._lock:
            for out in outs:
                if out.error is not None:
                    continue
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                batches.setdefault(stream.loop, []).append((stream, out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the consumers' event loop is closed: nobody will read these streams
                for _, out in items:
                    self._dropped(out)

    def _dropped(self, out: RequestOutput) -> None:
        log.warning("dropping request whose event loop is closed", extra={"request_id": out.request_id})
        with self._lock:
            self._streams.pop(out.request_id, None)
        if not out.finished:
            self.engine.abort(out.request_id)

    def _deliver(self, out: RequestOutput) -> None:
        if out.error is not None:  # the engine ended it for a fault: the caller gets the error
            self._fail(out.request_id, out.error)
            return
        with self._lock:
            stream = self._streams.get(out.request_id)
            if stream is not None and out.finished:
                del self._streams[out.request_id]
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
        except RuntimeError:  # the consumer's event loop is closed: nobody will read this stream
            self._dropped(out)

    def _fail(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            with contextlib.suppress(RuntimeError):  # event loop closed: nobody is listening
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
