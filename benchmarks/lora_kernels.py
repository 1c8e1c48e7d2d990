"""LoRA kernel microbenchmark: the LoRA part of one engine step, per backend, at SmolLM2's shapes, and
how close it comes to the machine's read bandwidth.

``python -m benchmarks.lora_kernels [--backends native,torch] [--storage float32,bfloat16]
[--scenarios ...] [--threads 2] [--repeat 10]``

For each scenario it places adapters (ranks cycling 8/16/32/64) in a paged arena as the server
does (rows packed by server/adapter_packing.py, in the storage dtype), prepares one step
(``prepare_step``) and times ``apply`` for every (layer, group) of the step, as the model calls
it: 30 layers x (q/k/v, o, gate/up, down). A decode step reads every row of every adapter in it
once: ``bytes`` is that, and ``GB/s`` the rate ``apply`` streams it at, next to the same run's read
bandwidth (``benchmarks.machine.read_bandwidth``). Medians over ``--repeat`` runs; figures are only
comparable within one run. Writes a table to stdout and JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from benchmarks.machine import BandwidthProbe, read_bandwidth
from kernels.backend import select_lora_backend
from kernels.lora import LoraSegments
from kernels.lora_pages import storage_view, write_matrix_rows
from kernels.step_buffer import StepBuffer, StepPack
from server.adapter_residency import AdapterResidency, AdapterSpec, ModuleSpec
from server.arena import zeroed_pages
from server.model_config import LORA_MODULES, ModelConfig
from server.page_layout import AdapterPageTable, PageLayout
from server.pool import PagePool

log = logging.getLogger("benchmarks.lora_kernels")
ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5)
QKVO = LORA_MODULES[:4]
# name: (tokens per adapter segment, number of adapters, target modules); segments sorted by adapter,
# as batch.py makes them. decode-a64-qkvo is the 64 distinct adapters of mean rank 30 on q,k,v,o.
SCENARIOS = {"decode-a64-qkvo": (1, 64, QKVO), "decode-a64": (1, 64, LORA_MODULES),
             "decode-a8": (8, 8, LORA_MODULES), "prefill-a8": (64, 8, LORA_MODULES)}
RANKS = (8, 16, 32, 64)
GOAL = 0.60  # of the read bandwidth, for the decode step of the C kernel


def make_arena(cfg: ModelConfig, layout: PageLayout, num_adapters: int, dtype: torch.dtype,
               modules: tuple[str, ...] = LORA_MODULES, storage: str | None = None,
               dora: bool = False) -> tuple[torch.Tensor, list[AdapterPageTable]]:
    """Adapters (ranks cycling RANKS) placed as the pool places them; their pages filled with small
    random values (DoRA: scale rows near 1, A and B as without DoRA)."""
    shapes = cfg.linear_shapes()
    specs = [AdapterSpec(uid=n, name=f"a{n}", modules={
        (layer, m): ModuleSpec(RANKS[n % len(RANKS)], 2.0, *shapes[m], dora=dora)
        for layer in range(cfg.num_layers) for m in modules}, dtype=storage) for n in range(num_adapters)]
    num_pages = sum(s.pages_needed(layout) for s in specs)
    residency = AdapterResidency(PagePool(num_pages), layout)
    tables = [residency.load(s) for s in specs]
    arena = zeroed_pages(num_pages, layout.page_bytes).view(dtype)  # as the engine allocates it
    view = storage_view(arena, storage)
    view.uniform_(-0.05, 0.05)  # finite, no denormals, in the rows' dtype
    for table in tables if dora else ():  # g rows share pages with other rows: written row by row
        for m in table.modules.values():
            g = 1.0 + torch.empty(1, m.out_features).uniform_(-0.05, 0.05)
            write_matrix_rows(view, m.g_pages, g, m.g_row0)
    return arena, tables


def bench(backend_name: str, scenario: str, dtype: torch.dtype, storage: str | None, repeat: int) -> dict:
    cfg = ModelConfig.from_hf_dict(SMOLLM2)
    layout = PageLayout.for_model(cfg, itemsize=dtype.itemsize)
    per_seg, num_adapters, modules = SCENARIOS[scenario]
    arena, tables = make_arena(cfg, layout, num_adapters, dtype, modules, storage)
    backend = select_lora_backend(arena, layout, "torch", backend_name)
    seg_starts = tuple(range(0, per_seg * num_adapters + 1, per_seg))
    segments = LoraSegments(seg_starts, tuple(range(num_adapters)))
    tokens = seg_starts[-1]
    groups = cfg.lora_groups()
    xs = {g.name: torch.randn(tokens, g.in_features).to(dtype) for g in groups}
    ys = {g.name: torch.zeros(tokens, g.out_features, dtype=dtype) for g in groups}
    buffer = StepBuffer(arena.device)
    weight_bytes = sum(t.weight_bytes(dtype.itemsize) for t in tables)
    probe = BandwidthProbe()
    prep, run, probes, ratios = [], [], [], []
    for i in range(repeat + 2):  # two warm-ups: buffers sized
        bw = probe.sample()  # paired with this repeat (and the caches left cold, as a step finds them)
        start = time.perf_counter()
        pack = StepPack()
        step = backend.prepare_step(segments, tables, pack)
        step.bind(buffer.upload(pack))
        mid = time.perf_counter()
        for layer in range(cfg.num_layers):
            for g in groups:
                step.apply(layer, g, xs[g.name], ys[g.name])
        end = time.perf_counter()
        if i >= 2:
            prep.append((mid - start) * 1e3)
            run.append((end - mid) * 1e3)
            probes.append(bw)
            ratios.append(weight_bytes / (end - mid) / 1e9 / bw)
    del probe
    apply_ms = statistics.median(run)
    return {"backend": backend_name, "scenario": scenario, "dtype": str(dtype).removeprefix("torch."),
            "storage": storage or str(dtype).removeprefix("torch."), "tokens": tokens,
            "adapters": num_adapters,
            "bytes": weight_bytes, "prepare_ms": statistics.median(prep), "apply_ms": apply_ms,
            "apply_ms_min": min(run), "apply_ms_max": max(run), "gbs": weight_bytes / apply_ms / 1e6,
            # the probe sampled before each repeat: its median, and the median of the per-repeat ratios
            "paired_read_gbs": statistics.median(probes), "of_read_bw": statistics.median(ratios),
            "threads": torch.get_num_threads()}


def table(results: list[dict], read_gbs: float) -> str:
    lines = [f"read bandwidth (same run, best of 5 after the kernels): {read_gbs:.1f} GB/s; "
             "'paired': the median over repeats of GB/s / a probe sample taken right before each",
             "| scenario | backend | rows | tokens | adapters | MB read | prepare ms | apply ms (min-max) "
             "| GB/s | of read BW |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['scenario']} | {r['backend']} | {r['storage']} | {r['tokens']} | "
                     f"{r['adapters']} | {r['bytes'] / 1e6:.0f} | {r['prepare_ms']:.2f} | "
                     f"{r['apply_ms']:.1f} ({r['apply_ms_min']:.1f}-{r['apply_ms_max']:.1f}) | "
                     f"{r['gbs']:.1f} | {100 * r['of_read_bw']:.0f}% of {r['paired_read_gbs']:.1f} paired "
                     f"({100 * r['gbs'] / read_gbs:.0f}% of the best) |")
    return "\n".join(lines)


def run(backends: list[str], scenarios: list[str], storages: list[str], dtype: torch.dtype,
        repeat: int) -> dict:
    """Every combination, then the read bandwidth (same process, same threads)."""
    results = [bench(b, s, dtype, None if st == str(dtype).removeprefix("torch.") else st, repeat)
               for s in scenarios for st in storages for b in backends]
    return {"results": results, "read_gbs": read_bandwidth()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="native,torch")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--storage", default="float32,bfloat16", help="storage dtypes of the adapter rows")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model (x, y) dtype")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_kernels.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    out = run(args.backends.split(","), args.scenarios.split(","), args.storage.split(","),
              getattr(torch, args.dtype), args.repeat)
    print(table(out["results"], out["read_gbs"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
