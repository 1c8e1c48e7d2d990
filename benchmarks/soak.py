"""``make soak``: minutes of mixed traffic against our HTTP server, looking for anything that grows.

Closed-loop inference clients (streaming and not, base and adapters, mixed lengths) run while an
admin client keeps replacing, deleting and re-uploading adapters, and uploading and deleting
short-lived ones. Requests naming an adapter that is deleted at that moment get 404, which is
expected; any 5xx, or any other status, is an error. Every minute it records requests served,
statuses, p50/p99 latency, and the server's RSS, open fds and threads; at the end, with traffic
stopped, pages and gauges must be back to idle.

Growth is a failure (exit 1): RSS more than ``RSS_SLACK`` over its level after the warm-up
minutes, fds (beyond ``FD_SLACK``) or threads above theirs, p50 latency of the last minutes
above ``LATENCY_SLACK`` times the early minutes'. The run is for a quiet machine; on a shared one
latency is noisy.

    python -m benchmarks.soak --minutes 10        # prints the table, writes benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.metrics import cpu_note, percentile
from benchmarks.systems.http import server

log = logging.getLogger("soak")

RSS_SLACK = 64 * 2**20  # allocator noise and caches reaching their bounds
FD_SLACK = 2  # sampled mid-traffic: an upload's temporary files, a connection being replaced
LATENCY_SLACK = 1.5
PROMPTS = ["Once upon a time", "The capital of France is", "def quicksort(xs):", "Dear customer,",
           "List three colors:", "In 1969, the first"]
FILES = ("adapter_config.json", "adapter_model.safetensors")
RESULTS = Path(__file__).parent / "results"


@dataclass
class Minute:
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    admin: Counter = field(default_factory=Counter)
    rss: int = 0
    fds: int = 0
    threads: int = 0


def proc_stats(pid: int) -> tuple[int, int, int]:
    status = {k: v for k, _, v in (line.partition(":") for line in Path(f"/proc/{pid}/status").read_text()
                                   .splitlines())}
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return int(status["VmRSS"].split()[0]) * 1024, fds, int(status["Threads"])


class Soak:
    def __init__(self, url: str, adapter_dirs: dict[str, Path], minutes: int, seed: int) -> None:
        self.url, self.dirs, self.rng = url, adapter_dirs, random.Random(seed)
        self.deadline = time.monotonic() + 60 * minutes
        self.start = time.monotonic()
        self.minutes = [Minute() for _ in range(minutes)]
        self.stable = sorted(adapter_dirs)[:-2]  # replaced in place, never absent
        self.churn = sorted(adapter_dirs)[-2:]  # deleted and re-uploaded: 404 while away
        self.expected_404 = 0

    def minute(self) -> Minute:
        return self.minutes[min(int((time.monotonic() - self.start) // 60), len(self.minutes) - 1)]

    async def upload(self, client: httpx.AsyncClient, adapter_id: str, src: str, replace: bool) -> int:
        files = {n: (n, (self.dirs[src] / n).read_bytes()) for n in FILES}
        data = {"adapter_id": adapter_id, "replace": "true" if replace else "false"}
        r = await client.post(f"{self.url}/v1/adapters", files=files, data=data)
        return r.status_code

    async def inference(self, client: httpx.AsyncClient) -> None:
        while time.monotonic() < self.deadline:
            model = self.rng.choice([None, None, *self.stable, *self.churn])
            body = {"prompt": self.rng.choice(PROMPTS), "max_tokens": self.rng.randint(8, 48),
                    "temperature": self.rng.choice([0, 0.8]), "stream": self.rng.random() < 0.5}
            if model:
                body["model"] = model
            began = time.monotonic()
            try:
                async with client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                    async for _ in r.aiter_raw():
                        pass
                    status = r.status_code
            except httpx.HTTPError as exc:
                log.warning("request failed: %r", exc)
                status = 0
            m = self.minute()
            if status == 404 and model in self.churn:
                self.expected_404 += 1
                status = "404 (deleted)"
            m.statuses[status] += 1
            if status == 200:
                m.latencies.append(time.monotonic() - began)

    async def admin(self, client: httpx.AsyncClient) -> None:
        away: set[str] = set()
        temp = 0
        while time.monotonic() < self.deadline:
            await asyncio.sleep(self.rng.uniform(2, 6))
            op = self.rng.choice(["replace", "churn", "temporary"])
            if op == "replace":
                target, src = self.rng.choice(self.stable), self.rng.choice(list(self.dirs))
                status = await self.upload(client, target, src, replace=True)
            elif op == "churn":
                name = self.rng.choice(self.churn)
                if name in away:
                    status = await self.upload(client, name, name, replace=False)
                    away.discard(name)
                else:
                    status = (await client.delete(f"{self.url}/v1/adapters/{name}")).status_code
                    away.add(name)
            else:
                temp += 1
                src = self.rng.choice(list(self.dirs))
                status = await self.upload(client, f"temp-{temp}", src, replace=False)
                if status == 201:
                    status = (await client.delete(f"{self.url}/v1/adapters/temp-{temp}")).status_code
            self.minute().admin[f"{op}:{status}"] += 1

    async def sampler(self, pid: int) -> None:
        for i, m in enumerate(self.minutes):
            await asyncio.sleep(max(0.0, self.start + 60 * (i + 1) - time.monotonic() - 1))
            m.rss, m.fds, m.threads = proc_stats(pid)

    async def run(self, pid: int, clients: int) -> None:
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            await asyncio.gather(self.sampler(pid), self.admin(client),
                                 *(self.inference(client) for _ in range(clients)))


def verdict(minutes: list[Minute], idle: dict) -> list[str]:
    """What grew, or went wrong; empty if nothing."""
    problems = [f"{n} x status {s} in minute {i + 1}" for i, m in enumerate(minutes)
                for s, n in m.statuses.items() if s not in (200, "404 (deleted)")]
    problems += [f"admin {k} x{n} in minute {i + 1}" for i, m in enumerate(minutes)
                 for k, n in m.admin.items() if not k.endswith((":200", ":201"))]
    base, late = minutes[1:3], minutes[-2:]
    rss0 = min(m.rss for m in base)
    if max(m.rss for m in late) > rss0 + RSS_SLACK:
        problems.append(f"RSS grew from {rss0 / 2**20:.0f} to {max(m.rss for m in late) / 2**20:.0f} MiB")
    for name, slack in (("fds", FD_SLACK), ("threads", 0)):
        first, last = max(getattr(m, name) for m in base), max(getattr(m, name) for m in late)
        if last > first + slack:
            problems.append(f"{name} grew from {first} to {last}")
    p50 = [statistics.median(m.latencies) for m in minutes if m.latencies]
    if len(p50) >= 4 and statistics.median(p50[-2:]) > LATENCY_SLACK * statistics.median(p50[1:3]):
        early, late_p50 = statistics.median(p50[1:3]), statistics.median(p50[-2:])
        problems.append(f"p50 latency grew from {early:.2f} to {late_p50:.2f} s")
    problems += [f"{k} is {v} after the traffic stopped" for k, v in idle.items() if v]
    return problems


def table(minutes: list[Minute]) -> str:
    rows = ["| min | served | other statuses | p50 s | p99 s | admin ops | RSS MiB | fds | threads |",
            "|---|---|---|---|---|---|---|---|---|"]
    for i, m in enumerate(minutes):
        other = ", ".join(f"{s}: {n}" for s, n in sorted(m.statuses.items(), key=str) if s != 200) or "-"
        p50, p99 = percentile(m.latencies, 50), percentile(m.latencies, 99)
        rows.append(f"| {i + 1} | {m.statuses[200]} | {other} | {p50 or 0:.2f} | {p99 or 0:.2f} | "
                    f"{sum(m.admin.values())} | {m.rss / 2**20:.0f} | {m.fds} | {m.threads} |")
    return "\n".join(rows)


def idle_state(url: str) -> dict:
    """Gauges that must be zero once traffic has stopped (waits briefly for the last aborts)."""
    def read() -> dict:
        text = httpx.get(f"{url}/metrics").text
        want = {'lora_server_pool_pages{kind="kv"}': "kv pages",
                "lora_server_num_requests_running": "running", "lora_server_num_requests_waiting": "waiting"}
        return {label: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                for key, label in want.items() if line.startswith(key + " ")}

    for _ in range(100):
        state = read()
        if not any(state.values()):
            break
        time.sleep(0.1)
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=int, default=10)
    p.add_argument("--clients", type=int, default=8, help="closed-loop inference clients")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="server torch/OpenMP threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.minutes < 4:
        p.error("--minutes must be at least 4 (two warm-up minutes, two to compare)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the table
    import torch

    from benchmarks.adapters import write_adapter
    from benchmarks.workload import adapter_specs
    from server.gguf_loader import GGUFFile
    from server.loader import default_model_path

    cfg = GGUFFile(default_model_path()).config()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        pool = torch.randn(1 << 22, generator=torch.Generator().manual_seed(7))
        specs = adapter_specs(args.adapters, ranks=(4, 8, 16), prefix="soak")
        for i, spec in enumerate(specs):
            write_adapter(Path(tmp) / "src", spec, cfg, pool, i, torch.float32)
        dirs = {s.adapter_id: Path(tmp) / "src" / s.adapter_id for s in specs}
        job = {"threads": args.threads, "dtype": "float32", "adapter_store": str(Path(tmp) / "store"),
               "pool_bytes": 256 * 2**20, "max_num_seqs": 32}
        log.info("soak: %d minutes, %d clients, %d adapters; %s", args.minutes, args.clients,
                 args.adapters, cpu_note())
        with server(job) as (url, proc):
            soak = Soak(url, dirs, args.minutes, args.seed)
            for name in dirs:
                asyncio.run(_upload_one(soak, name))
            asyncio.run(soak.run(proc.pid, args.clients))
            idle = idle_state(url)
    print(table(soak.minutes))
    problems = verdict(soak.minutes, idle)
    print("\n".join(["", "FAIL:", *problems]) if problems else "\nPASS: nothing grew, no errors")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps({
        "args": vars(args), "problems": problems, "idle": idle, "minutes": [
            {"statuses": {str(k): v for k, v in m.statuses.items()}, "p50": percentile(m.latencies, 50),
             "p99": percentile(m.latencies, 99), "admin": dict(m.admin), "rss": m.rss, "fds": m.fds,
             "threads": m.threads} for m in soak.minutes]}, indent=2))
    return 1 if problems else 0


async def _upload_one(soak: Soak, name: str) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        status = await soak.upload(client, name, name, replace=True)
        if status != 201:
            raise RuntimeError(f"initial upload of {name} answered {status}")


if __name__ == "__main__":
    raise SystemExit(main())
