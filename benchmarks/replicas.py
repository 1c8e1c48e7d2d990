"""Replicas behind a load balancer vs one replica, with the same client in one run; and the latency a
balancer adds. ``python -m benchmarks.replicas`` (``make bench-replicas``) prints a table and writes
``benchmarks/results/replicas.json``.

Throughput: a closed-loop client keeps ``--concurrency`` streaming completions in flight (greedy,
``ignore_eos``, ``--max-tokens`` each, adapters cycling over ``--adapters`` synthetic SmolLM2 adapters
plus the base model) until ``--requests`` are done; tok/s = generated tokens / wall time. It runs
against one replica directly, then three replicas on one shared store behind haproxy and behind
nginx (deploy/ configs). On a 2-core machine three replicas can't add compute: expect no gain.

Latency: ``--latency-requests`` sequential requests to one replica, directly and through each
balancer, interleaved; the balancer's cost is the difference of the medians. Two probes: a
one-token completion, and a completion naming an adapter that doesn't exist (the balancer parses the
body and hashes the id, the server answers 404 without running the model), which shows the
balancer's own cost without the model's run-to-run noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from benchmarks.topology import ROOT, Balancer, Replica, start_balancer, start_replica

log = logging.getLogger(__name__)
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--single-threads", type=int, default=2, help="threads of the lone replica")
    p.add_argument("--replica-threads", type=int, default=1, help="threads of each of the 3 replicas")
    p.add_argument("--latency-requests", type=int, default=60)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "replicas.json")
    return p.parse_args(argv)


def make_store(root: Path, count: int) -> list[str]:
    """``count`` synthetic rank-16 q/v adapters for SmolLM2 in a fresh store under ``root``."""
    import torch

    from adapter_store.store import AdapterStore
    from benchmarks.adapters import random_pool, write_adapter
    from benchmarks.workload import AdapterSpec
    from server.gguf_loader import GGUFFile
    from server.loader import default_model_path

    cfg = GGUFFile(default_model_path()).config()
    store, pool, names = AdapterStore(root / "store"), random_pool(), []
    for i in range(count):
        spec = AdapterSpec(f"bench-{i}", 16, ("q_proj", "v_proj"))
        store.put(spec.adapter_id, write_adapter(root / "peft", spec, cfg, pool, i, torch.float32))
        names.append(spec.adapter_id)
    return names


async def _drive(url: str, models: list[str | None], total: int, concurrency: int, max_tokens: int) -> dict:
    done = tokens = failed = 0
    served: dict[str, int] = {}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done, tokens, failed
        while done < total:
            model = models[done % len(models)]
            done += 1
            body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    **({"model": model} if model else {})}
            r = await client.post(f"{url}/v1/completions", json=body)
            if r.status_code != 200:
                failed += 1
                continue
            tokens += r.json()["usage"]["completion_tokens"]
            by = r.headers.get("x-served-by", "?")
            served[by] = served.get(by, 0) + 1

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "failed": failed, "served_by": served}


def throughput(url: str, models: list[str | None], args: argparse.Namespace) -> dict:
    asyncio.run(_drive(url, models, len(models), min(len(models), args.concurrency), 2))  # warm every adapter
    return asyncio.run(_drive(url, models, args.requests, args.concurrency, args.max_tokens))


PROBES = {  # name: (body, expected status)
    "1-token completion": ({"prompt": "Hi", "max_tokens": 1}, 200),
    "routing only (unknown adapter, 404)": ({"prompt": "Hi", "max_tokens": 1, "model": "no-such-adapter"},
                                            404),
}


def latency(targets: dict[str, str], n: int) -> dict[str, dict[str, float]]:
    """Median seconds per probe and target, sampled interleaved: {probe: {target: p50}}."""
    out = {}
    for probe, (body, status) in PROBES.items():
        samples: dict[str, list[float]] = {name: [] for name in targets}
        with httpx.Client(timeout=60) as client:
            for i in range(n + 3):
                for name, url in targets.items():
                    start = time.perf_counter()
                    r = client.post(f"{url}/v1/completions", json=body)
                    if r.status_code != status:
                        raise RuntimeError(f"{name}: {probe}: {r.status_code} {r.text}")
                    if i >= 3:  # the first rounds open connections and warm caches
                        samples[name].append(time.perf_counter() - start)
        out[probe] = {name: statistics.median(s) for name, s in samples.items()}
    return out


def _replicas(stack: ExitStack, tmp: Path, n: int, threads: int) -> list[Replica]:
    out = []
    for i in range(1, n + 1):
        r = start_replica(f"r{i}", tmp / "logs", tmp / "store",
                          ["--dtype", "float32", "--log-level", "warning", "--pool-bytes", "512MiB"], threads)
        stack.callback(r.stop)
        out.append(r)
    for r in out:
        r.wait_ready()
    return out


def _balancers(stack: ExitStack, tmp: Path, replicas: list[Replica], tag: str) -> dict[str, Balancer]:
    ports = {r.name: r.port for r in replicas}
    out = {}
    for kind in ("haproxy", "nginx"):
        b = start_balancer(kind, ports, tmp / f"{kind}-{tag}")
        stack.callback(b.stop)
        out[kind] = b
    return out


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as t:
        tmp = Path(t)
        models: list[str | None] = [*make_store(tmp, args.adapters), None]
        result: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
        with ExitStack() as stack:
            single = _replicas(stack, tmp, 1, args.single_threads)
            lbs = _balancers(stack, tmp, single, "single")
            result["latency_p50_s"] = latency({"direct": single[0].url, **{k: b.url for k, b in lbs.items()}},
                                              args.latency_requests)
            result["single"] = throughput(single[0].url, models, args)
        with ExitStack() as stack:
            three = _replicas(stack, tmp, 3, args.replica_threads)
            lbs = _balancers(stack, tmp, three, "three")
            for kind, b in lbs.items():
                result[f"three_{kind}"] = throughput(b.url, models, args)
    return result


def report(result: dict) -> str:
    base = result["single"]["tok_s"]
    rows = ["| setup | tok/s | vs 1 replica | failed | requests per replica |", "|---|---|---|---|---|"]
    for key, label in (("single", "1 replica, direct"), ("three_haproxy", "3 replicas, haproxy"),
                       ("three_nginx", "3 replicas, nginx")):
        r = result[key]
        spread = ", ".join(f"{k}: {v}" for k, v in sorted(r["served_by"].items()))
        rows.append(f"| {label} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f} | {r['failed']} | {spread} |")
    rows += ["", "| probe (1 replica) | path | p50 ms | added by the balancer, ms |", "|---|---|---|---|"]
    for probe, lat in result["latency_p50_s"].items():
        for name, p50 in lat.items():
            rows.append(f"| {probe} | {name} | {p50 * 1e3:.2f} | {(p50 - lat['direct']) * 1e3:+.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(report(result))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
