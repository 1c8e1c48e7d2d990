"""System (b): our HTTP server (``python -m server``, a subprocess) and a streaming client.

The server and this client share 2 cores. The server gets ``threads`` torch/OpenMP threads with
``GOMP_SPINCOUNT=20000`` (idle OpenMP workers spin only briefly, then sleep, so the client's event
loop gets the CPU between steps, while back-to-back small ops don't each pay a wake-up); the
client is one asyncio thread (uvloop when installed). Every CPU second the client spends is taken
from the server's cores, so it stays light, as a load generator should: it splits the stream into
SSE events and timestamps each, and parses JSON only for the final usage event. The CPU seconds of
both are reported.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.metrics import RequestTiming, pid_peak_rss, summarize
from benchmarks.systems.ours import WARM_PROMPT, WARM_TOKENS, cold_hot_prompt, cold_hot_summary, settings
from benchmarks.workload import RequestSpec

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(job: dict) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``python -m server`` on a free loopback port; yield its base URL once /health answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(job["threads"]), "--dtype", job["dtype"],
           "--adapter-store-dir", job["adapter_store"], "--max-num-seqs", str(job["max_num_seqs"]),
           "--host-cache-bytes", str(2 * 2**30),
           "--log-level", "warning"]
    if job.get("pool_bytes"):
        cmd += ["--pool-bytes", str(job["pool_bytes"])]
    if job.get("serving_dir"):
        cmd += ["--model", job["serving_dir"]]
    env = {**os.environ, "GOMP_SPINCOUNT": "20000", "OMP_NUM_THREADS": str(job["threads"])}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become healthy")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _one(client: httpx.AsyncClient, url: str, r: RequestSpec, start: float,
               rec: dict[str, RequestTiming]) -> None:
    await asyncio.sleep(max(0.0, start + r.arrival - time.perf_counter()))
    body = {"prompt": r.prompt_ids, "max_tokens": r.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if r.adapter_id:
        body["adapter_id"] = r.adapter_id
    t = rec[r.request_id] = RequestTiming(sent=time.perf_counter())
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        pending = b""
        async for piece in resp.aiter_raw():
            now = time.perf_counter()
            events = (pending + piece).split(b"\n\n")
            pending = events.pop()
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                if b'"choices":[]' not in event:  # a text chunk (the usage chunk has no choices)
                    t.token_times.append(now)
                if b'"usage":{' in event:
                    t.num_tokens = json.loads(event[6:])["usage"]["completion_tokens"]


async def _drive(url: str, requests: list[RequestSpec]) -> tuple[dict[str, RequestTiming], float]:
    limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=len(requests) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        rec: dict[str, RequestTiming] = {}
        start = time.perf_counter()
        await asyncio.gather(*(_one(client, url, r, start, rec) for r in requests))
        return rec, time.perf_counter() - start


def _warm(url: str, adapters: list[str | None]) -> None:
    """One short request per adapter (None: the base model), all at once."""
    warm = [RequestSpec(f"warmup-{i}", WARM_PROMPT, WARM_TOKENS, a) for i, a in enumerate(adapters or [None])]
    _run_loop(_drive(url, warm))


def _cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_loop(coro):  # noqa: ANN001, ANN202 - a coroutine and its result
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def run(job: dict, requests: list[RequestSpec]) -> dict:
    with server(job) as (url, proc):
        _warm(url, job.get("warm_adapters") or [])
        client0, server0 = _cpu_seconds(), _cpu_seconds(proc.pid)
        rec, wall = _run_loop(_drive(url, requests))
        result = summarize(list(rec.values()), wall, pid_peak_rss(proc.pid))
        result.update(client_cpu_s=_cpu_seconds() - client0, server_cpu_s=_cpu_seconds(proc.pid) - server0,
                      settings=f"{settings(job)}, streaming client")
        return result


def cold_vs_hot(job: dict, adapters: list[str]) -> dict:
    with server(job) as (url, _):
        _warm(url, [None])
        cold, hot = [], []
        for name in adapters:
            for sink in (cold, hot):
                prompt = cold_hot_prompt(len(cold) + len(hot))
                rec, _ = asyncio.run(_drive(url, [RequestSpec("x", prompt, 2, name)]))
                sink.append(rec["x"].ttft())
        return cold_hot_summary(cold, hot)
