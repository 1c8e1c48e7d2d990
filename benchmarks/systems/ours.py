"""System (a): our ``LLMEngine`` driven in-process, one ``step()`` at a time."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import replace

from benchmarks.machine import ModelShape, model_flops
from benchmarks.metrics import RequestTiming, self_peak_rss, summarize
from benchmarks.workload import RequestSpec
from server.config import EngineConfig
from server.engine import LLMEngine
from server.engine_types import StepInfo
from server.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def engine_config(job: dict) -> EngineConfig:
    """The engine configuration of a job: its dtype, threads, adapter root and any overrides."""
    base = EngineConfig(model=job.get("serving_dir"), dtype=job["dtype"], num_threads=job["threads"],
                        adapter_store_dir=job["adapter_store"],
                        pool_bytes=job.get("pool_bytes"), max_num_seqs=job["max_num_seqs"],
                        host_cache_bytes=2 * 2**30)
    return replace(base, **job.get("engine_overrides", {}))


def settings(job: dict, engine: LLMEngine | None = None) -> str:
    """The settings a row of ours ran with, for the results table (the pool as the engine sized it
    when the engine is at hand; the HTTP server's engine sizes it the same way)."""
    if engine is not None:
        pool = f"pool {engine.pool.num_pages * engine.layout.page_bytes / 2**30:.1f} GiB (auto)"
    else:
        pool = "pool auto"
    if job.get("pool_bytes"):
        pool = f"pool {job['pool_bytes'] / 2**30:.1f} GiB"
    extra = "".join(f", {k}={v}" for k, v in job.get("engine_overrides", {}).items())
    return f"{pool}, max_num_seqs={job['max_num_seqs']}, adapter rows auto{extra}"


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


# A warm-up request: 8 prompt tokens and 2 generated (a prefill and a decode step). With 40 and 4 the
# warm-up of a 64-adapter scenario prefilled 2,560 tokens: ~8 s of each job's start on 2 cores.
WARM_PROMPT, WARM_TOKENS = list(range(300, 308)), 2


def warm_up(engine: LLMEngine, adapters: list[str | None]) -> None:
    """One short request per adapter in ``adapters`` (None: the base model), all at once, so that
    first-call costs aren't measured and, in warm scenarios, every adapter is resident."""
    for i, adapter in enumerate(adapters or [None]):
        engine.add_request(WARM_PROMPT, _params(WARM_TOKENS), adapter, request_id=f"warmup-{i}")
    while engine.has_work():
        if not engine.step() and not engine.scheduler.running:
            time.sleep(0.001)  # adapters being read from disk: let the loader thread run


def drive(engine: LLMEngine, requests: list[RequestSpec],
          steps: list[StepInfo] | None = None) -> tuple[dict[str, RequestTiming], float]:
    """Submit each request at its arrival time and step until all finish; per-request timings (and
    what each step computed, into ``steps``)."""
    pending = sorted(requests, key=lambda r: r.arrival)
    timings: dict[str, RequestTiming] = {}
    start = time.perf_counter()
    i = 0
    while i < len(pending) or engine.has_work():
        now = time.perf_counter()
        while i < len(pending) and start + pending[i].arrival <= now:
            r = pending[i]
            timings[r.request_id] = RequestTiming(sent=time.perf_counter())
            engine.add_request(r.prompt_ids, _params(r.max_tokens), r.adapter_id, request_id=r.request_id)
            i += 1
        if not engine.has_work():
            time.sleep(max(0.0, start + pending[i].arrival - time.perf_counter()))
            continue
        outs = engine.step()
        if steps is not None and engine.last_step is not None:
            steps.append(engine.last_step)
            engine.last_step = None
        if not outs and not engine.scheduler.running:
            # Everything waits on an adapter read: spinning on step() would hold the GIL and starve
            # the loader thread (measured: a 30 ms read took 9 s). AsyncEngine needs the same.
            time.sleep(0.001)
            continue
        t = time.perf_counter()
        for out in outs:
            rec = timings[out.request_id]
            rec.token_times.append(t)
            rec.num_tokens += len(out.new_token_ids)
    return timings, time.perf_counter() - start


def decode_summary(steps: list[StepInfo], batch: int) -> dict:
    """The steady state: steps that only decode, with ``batch`` requests running (medians)."""
    full = [s for s in steps if s.num_decode == s.num_tokens == batch]
    if not full:
        return {"decode_steps": 0}
    ms = statistics.median(s.seconds for s in full) * 1e3
    shape = ModelShape.smollm2()
    return {"decode_steps": len(full), "decode_step_ms": ms, "decode_tok_s": batch / ms * 1e3,
            "decode_gflops": model_flops(shape, batch, batch) / ms / 1e6,
            "adapters_step": statistics.median(s.adapters for s in full),
            "adapter_bytes_step": statistics.median(s.adapter_bytes for s in full)}


def run(job: dict, requests: list[RequestSpec]) -> dict:
    engine = LLMEngine(engine_config(job))
    warm_up(engine, job.get("warm_adapters") or [])
    before = engine.stats().prefix_cache
    steps: list[StepInfo] = []
    cpu0 = time.process_time()
    timings, wall = drive(engine, requests, steps)
    result = summarize(list(timings.values()), wall, self_peak_rss())
    result["server_cpu_s"] = time.process_time() - cpu0
    pc = engine.stats().prefix_cache
    queries = pc.queries - before.queries
    result["prefix_cache_hit_rate"] = (pc.hits - before.hits) / queries if queries else None
    result.update(decode_summary(steps, job["max_num_seqs"]))
    result["settings"] = settings(job, engine)
    return result


def cold_vs_hot(job: dict, adapters: list[str]) -> dict:
    """TTFT of a lone request on a never-seen adapter (disk only), then on the same adapter hot."""
    engine = LLMEngine(engine_config(job))
    warm_up(engine, [None])
    cold, hot = [], []
    for name in adapters:
        for sink in (cold, hot):
            prompt = cold_hot_prompt(len(cold) + len(hot))
            timings, _ = drive(engine, [RequestSpec(f"{name}-{len(sink)}", prompt, 2, name)])
            sink.append(next(iter(timings.values())).ttft())
    return cold_hot_summary(cold, hot)


def cold_hot_prompt(n: int) -> list[int]:
    """The n-th request's prompt of the cold-vs-hot run: 64 tokens of its own, so that the hot request
    (same adapter, now resident) prefills as much as the cold one. With one prompt for both, the hot
    request found the cold one's prompt in the prefix cache and prefilled 16 of 64 tokens: the ratio
    measured prefix caching, not the adapter's load."""
    return [500 + 64 * n + j for j in range(64)]


def cold_hot_summary(cold: list[float], hot: list[float]) -> dict:
    from benchmarks.metrics import percentile

    c, h = percentile(cold, 50), percentile(hot, 50)
    return {"cold_ttft_ms": [x * 1000 for x in cold], "hot_ttft_ms": [x * 1000 for x in hot],
            "cold_p50_ms": c * 1000, "hot_p50_ms": h * 1000, "cold_over_hot": c / h}

