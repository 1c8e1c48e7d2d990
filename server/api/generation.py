"""From a validated HTTP request to engine requests, and back: adapter choice, prompt checks, the
fan-out of one HTTP request into several engine requests, and aborting them when the client leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request

from adapter_store.tenancy import split
from server.api.errors import ClientDisconnected
from server.api.guards import CLEANUPS
from server.api.metrics import Labels, ServerMetrics
from server.api.tenants import NO_TENANT, Principal
from server.engine_types import RequestOutput
from server.errors import AdapterUnavailable, ServerError, UnknownAdapter
from server.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_END = object()  # a choice's engine stream ended


def resolve_adapter(engine: Any, principal: Principal, model: str | None,
                    adapter_id: str | None) -> str | None:
    """The stored id of the adapter a request asks for (None = base). ``adapter_id`` wins over
    ``model``; ``model`` may be the base model's id, an adapter id, or absent. An adapter the caller
    can't see (another tenant's) is answered exactly like one that does not exist: 404."""
    if adapter_id is not None:
        return _require_adapter(engine, principal, adapter_id, param="adapter_id")
    if model is None or model == "" or model == engine.model_name:
        return None
    return _require_adapter(engine, principal, model, param="model")


def _require_adapter(engine: Any, principal: Principal, name: str, param: str) -> str:
    # A ``model`` that can't be an adapter id (say ``org/model``) is just not a model we serve: 404.
    stored = principal.stored_id(name) if param == "adapter_id" else principal.qualify(name)
    if stored is not None:
        try:
            engine.get_adapter(stored)
            return stored
        except UnknownAdapter:
            pass
    err = UnknownAdapter(name)
    if param == "model":
        err.message = f"model {name!r} is neither the base model {engine.model_name!r} nor an adapter"
    err.param = param
    raise err


def sampling_params(fields: dict[str, Any], choice: int) -> SamplingParams:
    """SamplingParams for choice ``choice`` of n: fields left unset keep SamplingParams' defaults; a seed
    is offset per choice so n seeded choices differ yet stay reproducible."""
    given = {k: v for k, v in fields.items() if v is not None}
    if "seed" in given and choice:
        given["seed"] = given["seed"] + choice
    return SamplingParams(**given)


@dataclass
class RequestContext:
    """What every inference route needs: the engine, metrics, the request id and the adapter."""

    engine: Any
    metrics: ServerMetrics
    endpoint: str
    request_id: str
    adapter_id: str | None  # the stored id (``tenant:name`` for a tenant's adapter), None = base
    label: str  # the ``model`` field of responses: the adapter as the caller names it, or the base
    labels: Labels  # (tenant, adapter) metrics labels
    created: int
    tokenizer: Any  # the adapter's own tokenizer if it was saved with one, else the base model's

    @classmethod
    def open(cls, request: Request, endpoint: str, prefix: str, model: str | None,
             adapter_id: str | None) -> RequestContext:
        """Resolve the adapter and take one of the tenant's concurrent-request slots (429 if none is
        free); the slot is given back when the response is over (``RequestGuard``'s clean-ups)."""
        state = request.app.state
        principal: Principal = request.state.principal
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        request.state.request_id = request_id
        resolved = resolve_adapter(state.engine, principal, model, adapter_id)
        label = principal.display(resolved) if resolved else state.engine.model_name
        owner, name = split(resolved) if resolved else (principal.tenant, state.engine.model_name)
        labels = metric_labels(owner, name)
        request.state.adapter_id, request.state.labels = resolved, labels
        getattr(request.state, CLEANUPS).append(state.request_gate.enter(principal))
        return cls(state.engine, state.metrics, endpoint, request_id, resolved, label, labels,
                   int(time.time()), state.engine.tokenizer_for(resolved))

    def group(self, request: Request) -> GenerationGroup:
        return GenerationGroup(self.engine, request, self.metrics, self.adapter_id, self.labels, self.label)

    def done(self, request: Request, status: int) -> None:
        """Count the HTTP request once, whatever path it ended on."""
        if not getattr(request.state, "counted", False):
            request.state.counted = True
            self.metrics.count_request(self.endpoint, self.labels, status)


def metric_labels(tenant: str | None, adapter: str) -> Labels:
    return (tenant or NO_TENANT, adapter)


@dataclass
class Choice:
    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    finished: bool = False
    last: RequestOutput | None = None
    submitted: float = field(default_factory=time.monotonic)


class GenerationGroup:
    """The engine requests behind one HTTP request, run concurrently and aborted together.

    ``start()`` submits them and waits until each has produced its first output, so that admission
    errors (queue full, adapter deleted) become an HTTP status before any streaming starts. A watcher
    aborts everything the moment the client disconnects, which frees the requests' pages at once.
    """

    def __init__(self, engine: Any, request: Request, metrics: ServerMetrics, adapter_id: str | None,
                 labels: Labels, shown_id: str) -> None:
        self._engine, self._request, self._metrics = engine, request, metrics
        self.adapter_id, self._labels, self._shown_id = adapter_id, labels, shown_id
        self.choices: list[Choice] = []
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._aborted: set[str] = set()
        self._closed = False
        self.disconnected = False

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.choices.append(Choice(len(self.choices), request_id, prompt_ids, params))

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump(c)) for c in self.choices]
        self._tasks.append(asyncio.create_task(self._watch_disconnect()))
        waiting = {c.index for c in self.choices}
        while waiting:
            index, item = await self._next()
            waiting.discard(index)
            if item is not _END:
                self._buffer.append((index, item))

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output of every choice, in arrival order, until all are finished."""
        for index, out in self._buffer:
            yield index, out
        self._buffer.clear()
        while not all(c.finished for c in self.choices):
            index, item = await self._next()
            if item is not _END:
                yield index, item

    async def _next(self) -> tuple[int, Any]:
        index, item = await self._queue.get()
        if isinstance(item, BaseException):
            await self.close()
            raise item
        if item is _END:
            self.choices[index].finished = True
        return index, item

    async def _pump(self, choice: Choice) -> None:
        prev = choice.submitted
        try:
            async for out in self._engine.generate(choice.prompt_ids, choice.params,
                                                   adapter_id=self.adapter_id, request_id=choice.request_id):
                now = time.monotonic()
                self._metrics.observe_tokens(self._labels, choice.last is None, now - prev,
                                             len(out.new_token_ids))
                prev, choice.last = now, out
                self._queue.put_nowait((choice.index, out))
                if out.finished:
                    self._finish(choice)
                    break
        except UnknownAdapter:  # deleted since it was resolved: the caller's own name for it, as ever
            self._queue.put_nowait((choice.index, UnknownAdapter(self._shown_id)))
            return
        except AdapterUnavailable as exc:
            self._queue.put_nowait((choice.index, exc.for_id(self._shown_id)))
            return
        except ServerError as exc:  # delivered to the consumer, which maps it to an HTTP error
            self._queue.put_nowait((choice.index, exc))
            return
        except Exception:
            logger.exception("engine request failed", extra={"request_id": choice.request_id,
                                                             "adapter_id": self.adapter_id or "-"})
            self._queue.put_nowait((choice.index, ServerError("the engine failed on this request; the "
                                                              "details are in the server log")))
            return
        self._queue.put_nowait((choice.index, _END))

    def _finish(self, choice: Choice) -> None:
        out = choice.last
        if out is not None:
            self._metrics.observe_finished(self._labels, out.num_prompt_tokens, out.num_output_tokens,
                                           time.monotonic() - choice.submitted)
        logger.info("engine request finished: %s, %d tokens",
                    out.finish_reason if out else "no output", out.num_output_tokens if out else 0,
                    extra={"request_id": choice.request_id, "adapter_id": self.adapter_id or "-"})

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self._request.receive()
            if message["type"] == "http.disconnect":
                break
        self.disconnected = True
        logger.info("client disconnected; aborting", extra={"request_id": self._request.state.request_id,
                                                            "adapter_id": self.adapter_id or "-"})
        await self._abort_unfinished()
        self._queue.put_nowait((-1, ClientDisconnected("client disconnected")))

    async def _abort_unfinished(self) -> None:
        with anyio.CancelScope(shield=True):
            for c in self.choices:
                done = c.finished or (c.last is not None and c.last.finished)
                if not done and c.request_id not in self._aborted:
                    self._aborted.add(c.request_id)
                    await self._engine.abort(c.request_id)

    async def close(self) -> None:
        """Abort what is still running and stop the helper tasks. Safe to call twice, and shielded so
        a cancelled stream (client gone) still frees its engine requests."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._abort_unfinished()
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
