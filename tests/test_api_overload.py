"""Overload: a burst far beyond the waiting-queue bound. Every request gets an answer (no hang):
200, or 503 with Retry-After, nothing else; the server's memory does not grow with the burst; and
with a pool too small for all running requests, preemption recomputes some of them, yet every
admitted request finishes with exactly its max_tokens and the text it gets alone (greedy).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.api_helpers import metric, rss_bytes, wait_until

pytestmark = pytest.mark.slow

MAX_SEQS, MAX_WAITING, BURST = 4, 8, 400
PROMPTS = ["Once upon a time", "The capital of France is"]
MAX_TOKENS = 64  # 4 running x 5 KV blocks x 30 layers = 600 pages > the 512-page pool: preemption


@pytest.fixture(scope="module")
def server(api_server_factory):
    s = api_server_factory("--pool-bytes", "12MiB", "--max-num-seqs", str(MAX_SEQS), "--max-waiting",
                           str(MAX_WAITING), "--max-num-batched-tokens", "256")
    yield s
    s.stop()  # its memory and CPU go back to the rest of the suite


def body(i: int) -> dict:
    return {"prompt": PROMPTS[i % 2], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


async def burst(url: str, n: int, first: int = 0) -> list[httpx.Response]:
    """``n`` requests at once; request i uses prompt ``(first + i) % 2``."""
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=60), limits=limits) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body(first + i))
                                      for i in range(n)))


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def peak_rss(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_burst_beyond_the_queue(server):
    alone = {p: asyncio.run(burst(server.url, 1, p))[0].json()["choices"][0]["text"] for p in range(2)}
    asyncio.run(burst(server.url, 16))  # warm up: allocator pools and connection handling at scale
    assert wait_until(lambda: metric(server.url, "lora_server_num_requests_running") == 0, timeout=300)
    pid = server.proc.pid
    preempted = metric(server.url, "lora_server_preemptions_total")
    before = rss_bytes(pid)
    reset_peak_rss(pid)

    responses = asyncio.run(burst(server.url, BURST))

    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    # The first MAX_WAITING arrivals always get in. More do once the engine moves some to running,
    # but a burst can fill the queue before the engine's next step, and a preempted request takes
    # its waiting slot back: MAX_SEQS + MAX_WAITING is typical, not guaranteed (CI saw 11).
    assert MAX_WAITING <= statuses[200] < BURST // 4
    for i, r in enumerate(responses):
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "overloaded"
        else:
            assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["choices"][0]["text"] == alone[i % 2]
    assert metric(server.url, "lora_server_preemptions_total") > preempted  # preemption did happen
    # 400 requests, 30-odd served: what the rejected ones cost is tiny and returned at once.
    assert peak_rss(pid) - before < 96 * 2**20, (before, peak_rss(pid))
    assert wait_until(lambda: metric(server.url, "lora_server_pool_pages", kind="kv") == 0)
    assert metric(server.url, "lora_server_num_requests_waiting") == 0
    assert httpx.get(f"{server.url}/ready").status_code == 200
