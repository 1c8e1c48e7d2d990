"""Prometheus metrics: request counters and latency histograms fed by the routes, engine gauges read
from ``engine.stats()`` at scrape time.

Each app gets its own ``CollectorRegistry`` so two servers in one process (tests) don't collide.
Wherever there is an ``adapter`` label there is a ``tenant`` label: ``adapter`` is the adapter's name
(without its tenant), or the base model's id for base requests; ``tenant`` is the adapter's owner
(for base requests, the caller's tenant), ``-`` for none. Ids that did not resolve are counted as
``unresolved`` so a client can't grow the label set with garbage names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.api.tenants import NO_TENANT

PREFIX = "lora_server"
UNRESOLVED = "unresolved"
Labels = tuple[str, str]  # (tenant, adapter)
LABELS = ["tenant", "adapter"]
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UPLOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineCollector(Collector):
    """Gauges and counters that mirror ``engine.stats()``; read on every scrape, never cached."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self._engine.stats()
        yield _gauge("num_requests_running", "Requests running in the engine.", s.num_running)
        yield _gauge("num_requests_waiting", "Requests waiting for a slot or an adapter.", s.num_waiting)
        pages = GaugeMetricFamily(
            f"{PREFIX}_pool_pages", "Pool pages by use: kv = KV blocks of running requests, cached = "
            "cached KV blocks no request reads (reclaimable), adapter = resident adapters, free = "
            "holding nothing.", labels=["kind"])
        pages.add_metric(["kv"], s.pool_pages_kv)
        pages.add_metric(["cached"], s.pool_pages_cached)
        pages.add_metric(["adapter"], s.pool_pages_adapter)
        pages.add_metric(["free"], s.pool_pages_empty)
        yield pages
        yield _gauge("pool_pages_total", "Pages in the unified pool.", s.pool_pages_total)
        yield _gauge("pool_page_bytes", "Bytes per pool page.", s.page_bytes)
        adapters = GaugeMetricFamily(f"{PREFIX}_adapters", "Adapters by where they are.", labels=["location"])
        adapters.add_metric(["device"], s.adapters_resident)
        adapters.add_metric(["host"], s.adapters_host)
        adapters.add_metric(["disk"], s.adapters_stored)
        yield adapters
        yield _counter("adapter_loads", "Adapter copies into pool pages.", s.adapter_loads_total)
        yield _counter("adapter_evictions", "Adapters evicted from pool pages.", s.adapter_evictions_total)
        yield _counter("preemptions", "Requests preempted for lack of pages.", s.preemptions_total)
        failures = CounterMetricFamily(
            f"{PREFIX}_adapter_load_failures", "Adapter loads from disk that failed, by reason: corrupt "
            "(checksum mismatch), missing (file gone), io (read error), invalid (does not parse or fit), "
            "too_large (more than this server's host cache or pool), error (anything else).",
            labels=["reason"])
        for reason, count in s.adapter_load_failures.items():
            failures.add_metric([reason], count)
        yield failures
        yield from _prefix_cache_metrics(s)
        yield _gauge("host_cache_bytes", "Bytes of adapter weights in the host cache.", s.host_cache_bytes)
        yield _lora_requests_info(s)


def _prefix_cache_metrics(s: Any) -> Iterator[Metric]:
    """vLLM's token counters (hit rate = hits / queries) and our block and eviction counts."""
    pc = s.prefix_cache
    yield CounterMetricFamily("vllm:prefix_cache_queries",
                              "Prefix cache queries, in terms of number of queried tokens.", value=pc.queries)
    yield CounterMetricFamily("vllm:prefix_cache_hits",
                              "Prefix cache hits, in terms of number of cached tokens.", value=pc.hits)
    yield _counter("prefix_cache_preempted_queries",
                   "Prefix cache queries of requests recomputed after preemption (tokens).",
                   pc.preempted_queries)
    yield _counter("prefix_cache_preempted_hits",
                   "Prefix cache hits of requests recomputed after preemption (tokens).", pc.preempted_hits)
    blocks = GaugeMetricFamily(f"{PREFIX}_prefix_cache_blocks",
                               "Cached KV blocks (one page per layer each), read by a request or not.",
                               labels=["state"])
    blocks.add_metric(["in_use"], pc.blocks - pc.blocks_evictable)
    blocks.add_metric(["evictable"], pc.blocks_evictable)
    yield blocks
    yield _counter("prefix_cache_dropped_blocks",
                   "Cached KV blocks dropped because their adapter version was deleted or replaced.",
                   pc.blocks_dropped)
    evictions = CounterMetricFamily(f"{PREFIX}_evictions",
                                    "Units evicted from the pool to make room, by kind.", labels=["kind"])
    for kind, count in sorted(s.evictions.items()):
        evictions.add_metric([kind], count)
    yield evictions


class TenantCollector(Collector):
    """Each tenant's inference requests in flight (what its ``max_concurrent_requests`` bounds)."""

    def __init__(self, in_flight: Callable[[], dict[str, int]]) -> None:
        self._in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(f"{PREFIX}_tenant_requests_in_flight",
                                  "Inference requests in flight per tenant.", labels=["tenant"])
        for tenant, count in sorted(self._in_flight().items()):
            gauge.add_metric([tenant], count)
        yield gauge


def _lora_requests_info(s: Any) -> GaugeMetricFamily:
    """vLLM's ``lora_requests_info``: labels carry the state, the value is the scrape time.

    LoRA-aware routers (e.g. the Gateway API inference extension) pick the replica that already has
    an adapter running from these labels.
    """
    info = GaugeMetricFamily(
        "lora_requests_info",
        "Running and waiting LoRA adapters (comma-separated) and the adapter capacity.",
        labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
    )
    info.add_metric(
        [",".join(sorted(set(s.running_adapters))), ",".join(sorted(set(s.waiting_adapters))),
         str(s.max_loras)],
        time.time(),
    )
    return info


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, engine: Any, in_flight: Callable[[], dict[str, int]] = dict) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Inference requests by endpoint, tenant, adapter and "
                                "status.", ["endpoint", *LABELS, "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", LABELS,
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated.", LABELS,
                                         registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to first token.", LABELS,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between generated tokens.",
                             LABELS, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_request_latency_seconds", "Engine request latency, end to end.",
                             LABELS, buckets=E2E_BUCKETS, registry=r)
        self.upload = Histogram(f"{PREFIX}_adapter_upload_seconds",
                                "Adapter upload: validation and atomic store.", buckets=UPLOAD_BUCKETS,
                                registry=r)
        self.adapter_load = Histogram(f"{PREFIX}_adapter_load_seconds",
                                      "Adapter load latency: disk -> host memory, host -> pool pages.",
                                      ["tier"], buckets=LOAD_BUCKETS, registry=r)
        r.register(EngineCollector(engine))
        r.register(TenantCollector(in_flight))
        self._engine = engine

    def render(self) -> tuple[bytes, str]:
        for tier, seconds in self._engine.drain_load_times():
            self.adapter_load.labels(tier).observe(seconds)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def count_request(self, endpoint: str, labels: Labels, status: int) -> None:
        self.requests.labels(endpoint, *labels, str(status)).inc()

    def on_request_error(self, request: Request, status: int) -> None:
        """Error-handler hook: count failed inference requests (others aren't in this metric)."""
        endpoint = ENDPOINTS.get(request.url.path)
        if endpoint is not None and not getattr(request.state, "counted", False):
            request.state.counted = True
            principal = getattr(request.state, "principal", None)
            unresolved = (principal.label if principal is not None else NO_TENANT, UNRESOLVED)
            self.count_request(endpoint, getattr(request.state, "labels", unresolved), status)

    def observe_tokens(self, labels: Labels, first: bool, elapsed: float, num_tokens: int) -> None:
        """One streamed output of ``num_tokens`` tokens, ``elapsed`` after the previous one (or after
        submission when ``first``)."""
        if num_tokens <= 0:
            return
        if first:
            self.ttft.labels(*labels).observe(elapsed)
            num_tokens -= 1
            elapsed = 0.0
        per_token = elapsed / num_tokens if num_tokens else 0.0
        for _ in range(num_tokens):
            self.itl.labels(*labels).observe(per_token)

    def observe_finished(self, labels: Labels, prompt_tokens: int, output_tokens: int,
                         latency: float) -> None:
        self.prompt_tokens.labels(*labels).inc(prompt_tokens)
        self.generation_tokens.labels(*labels).inc(output_tokens)
        self.e2e.labels(*labels).observe(latency)
