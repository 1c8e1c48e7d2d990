"""Load with disconnects: 256 concurrent streaming clients over HTTP (SmolLM2, 16 adapters of mixed
ranks and modules, mixed with the base model), a quarter of them hanging up at a random point
mid-stream. Every other request must end with exactly its max_tokens and the text it gets alone
(greedy); afterwards pool pages by kind, the running/waiting gauges, the server's open file
descriptors and threads are back to their baseline.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass

import httpx
import pytest

from tests.api_helpers import (
    BASE,
    metric,
    metrics,
    open_fds,
    threads,
    upload,
    wait_until,
    write_adapter,
)

pytestmark = pytest.mark.slow

CLIENTS = 256
DISCONNECT_SHARE = 0.25
PROMPTS = ["Once upon a time", "def fibonacci(n):"]  # x 17 models: 34 references, each run alone
MODULE_SETS = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
               ("gate_proj", "up_proj", "down_proj"), ("v_proj", "down_proj")]
RANKS = [4, 8, 16, 32]
NUM_ADAPTERS = 16


@dataclass(frozen=True)
class Combo:
    model: str
    prompt: str
    max_tokens: int

    def body(self) -> dict:
        return {"model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


@dataclass
class Outcome:
    status: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    disconnected: bool = False


@pytest.fixture(scope="module")
def server(api_server_factory, tmp_path_factory):
    s = api_server_factory("--pool-bytes", "256MiB", "--max-num-seqs", "64",
                           "--max-num-batched-tokens", "512", "--max-waiting", "1024")
    root = tmp_path_factory.mktemp("load_adapters")
    for i in range(NUM_ADAPTERS):
        path = write_adapter(root / f"a{i}", rank=RANKS[i % 4], modules=MODULE_SETS[i // 4], seed=100 + i)
        assert upload(s.url, f"load-{i}", path).status_code == 201
    yield s
    s.stop()  # its memory and CPU go back to the rest of the suite


async def stream_one(client: httpx.AsyncClient, url: str, combo: Combo, hang_up_after: int | None) -> Outcome:
    async with client.stream("POST", f"{url}/v1/completions", json=combo.body()) as r:
        if r.status_code != 200:
            await r.aread()
            return Outcome(r.status_code, r.text)
        out, chunks = Outcome(200), 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                out.completion_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                out.text += choice["text"]
                out.finish_reason = choice["finish_reason"] or out.finish_reason
                chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                out.disconnected = True
                return out  # leaving the block closes the connection mid-stream
        return out


async def run_clients(url: str, plan: list[tuple[Combo, int | None]]) -> list[Outcome]:
    limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=60), limits=limits) as client:
        return await asyncio.gather(*(stream_one(client, url, c, k) for c, k in plan))


def baseline(url: str, pid: int) -> dict[str, float]:
    names = {"kv": ("lora_server_pool_pages", {"kind": "kv"}),
             "cached": ("lora_server_pool_pages", {"kind": "cached"}),
             "adapter": ("lora_server_pool_pages", {"kind": "adapter"}),
             "free": ("lora_server_pool_pages", {"kind": "free"}),
             "running": ("lora_server_num_requests_running", {}),
             "waiting": ("lora_server_num_requests_waiting", {})}
    state = {k: metric(url, n, **labels) for k, (n, labels) in names.items()}
    return {**state, "fds": open_fds(pid), "threads": threads(pid)}


def test_256_streaming_clients_with_disconnects(server):
    rng = random.Random(12)
    models = [BASE] + [f"load-{i}" for i in range(NUM_ADAPTERS)]
    combos = [Combo(m, p, 8 + 8 * ((i + j) % 3))  # max_tokens 8, 16 or 24
              for i, m in enumerate(models) for j, p in enumerate(PROMPTS)]
    # Each combo alone, one after another: the reference text. This also makes every adapter resident,
    # so the baseline below includes their pages.
    alone = {c: asyncio.run(run_clients(server.url, [(c, None)]))[0] for c in combos}
    assert all(o.status == 200 and o.completion_tokens == c.max_tokens for c, o in alone.items())
    texts = {o.text for c, o in alone.items() if c.prompt == PROMPTS[0]}
    assert len(texts) > NUM_ADAPTERS // 2  # the adapters do change the text
    pid = server.proc.pid
    assert wait_until(lambda: metric(server.url, "lora_server_pool_pages", kind="kv") == 0)
    before = baseline(server.url, pid)

    hang_ups = set(rng.sample(range(CLIENTS), int(CLIENTS * DISCONNECT_SHARE)))
    plan = []
    for i in range(CLIENTS):
        combo = combos[rng.randrange(len(combos))]
        plan.append((combo, rng.randint(1, combo.max_tokens - 1) if i in hang_ups else None))
    outcomes = asyncio.run(run_clients(server.url, plan))

    finished = [(c, o) for (c, k), o in zip(plan, outcomes, strict=True) if k is None]
    assert len(finished) == CLIENTS - len(hang_ups)
    assert all(o.disconnected for (c, k), o in zip(plan, outcomes, strict=True) if k is not None)
    wrong = [(c, o) for c, o in finished if (o.status, o.finish_reason, o.completion_tokens, o.text)
             != (200, "length", c.max_tokens, alone[c].text)]
    assert not wrong, wrong[:3]

    def settled() -> bool:
        return baseline(server.url, pid) == before

    assert wait_until(settled, timeout=60), (before, baseline(server.url, pid))
    hung_up = sum(v for (name, labels), v in metrics(server.url).items()
                  if name == "lora_server_requests_total" and dict(labels)["status"] == "499")
    assert hung_up == len(hang_ups)  # each disconnect was seen and counted once
