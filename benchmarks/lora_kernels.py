"""LoRA kernel microbenchmark: the LoRA part of one engine step, per backend, at SmolLM2's shapes.

``python -m benchmarks.lora_kernels [--backends native,torch] [--threads 2] [--repeat 20]``

For each scenario it writes random adapters (ranks cycling 8/16/32/64, all seven modules) into a
paged arena laid out as the server lays it out, prepares one step (``prepare_step``) and times
``apply`` for every (layer, group) of the step, as the model calls it: 30 layers x (q/k/v, o,
gate/up, down). Reports the median over ``--repeat`` runs in milliseconds per step, and the
preparation time separately. Run it on a quiet machine; the figures are only comparable within
one run. Writes a table to stdout and JSON to ``benchmarks/results/lora_kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from kernels.backend import select_lora_backend
from kernels.lora import LoraSegments
from kernels.step_buffer import StepBuffer, StepPack
from server.adapter_residency import AdapterResidency, AdapterSpec, ModuleSpec
from server.model_config import LORA_MODULES, ModelConfig
from server.page_layout import PageLayout
from server.pool import PagePool

log = logging.getLogger("benchmarks.lora_kernels")
ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5)
# name: (tokens per adapter segment, number of adapters); segments sorted by adapter, as batch.py makes them
SCENARIOS = {"decode-a8": (8, 8), "decode-a64": (1, 64), "prefill-a8": (64, 8)}
RANKS = (8, 16, 32, 64)


def make_arena(cfg: ModelConfig, layout: PageLayout, num_adapters: int, dtype: torch.dtype,
               dora: bool = False):
    """Random adapters (ranks cycling RANKS, all seven modules; DoRA: with scale rows) in an arena."""
    shapes = cfg.linear_shapes()
    specs = [AdapterSpec(uid=n, name=f"a{n}", modules={
        (layer, m): ModuleSpec(RANKS[n % len(RANKS)], 2.0, *shapes[m], dora=dora)
        for layer in range(cfg.num_layers) for m in LORA_MODULES}) for n in range(num_adapters)]
    num_pages = sum(s.pages_needed(layout) for s in specs)
    residency = AdapterResidency(PagePool(num_pages), layout)
    tables = [residency.load(s) for s in specs]
    arena = torch.randn(num_pages, layout.page_elems) * 0.05
    for table in tables if dora else ():  # DoRA's scale rows near 1; A and B as without DoRA
        for m in table.modules.values():
            arena[list(m.g_pages)] += 1.0
    return arena.to(dtype), tables


def bench(backend_name: str, scenario: str, dtype: torch.dtype, repeat: int) -> dict:
    cfg = ModelConfig.from_hf_dict(SMOLLM2)
    layout = PageLayout.for_model(cfg)
    per_seg, num_adapters = SCENARIOS[scenario]
    arena, tables = make_arena(cfg, layout, num_adapters, dtype)
    backend = select_lora_backend(arena, layout, "torch", backend_name)
    seg_starts = tuple(range(0, per_seg * num_adapters + 1, per_seg))
    segments = LoraSegments(seg_starts, tuple(range(num_adapters)))
    tokens = seg_starts[-1]
    groups = cfg.lora_groups()
    xs = {g.name: torch.randn(tokens, g.in_features).to(dtype) for g in groups}
    ys = {g.name: torch.zeros(tokens, g.out_features, dtype=dtype) for g in groups}
    buffer = StepBuffer(arena.device)
    prep, run = [], []
    for i in range(repeat + 2):  # two warm-ups: caches filled, buffers sized
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
    return {"backend": backend_name, "scenario": scenario, "dtype": str(dtype).removeprefix("torch."),
            "tokens": tokens, "adapters": num_adapters, "prepare_ms": statistics.median(prep),
            "apply_ms": statistics.median(run), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="native,torch")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_kernels.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    results = [bench(b, s, getattr(torch, args.dtype), args.repeat)
               for s in args.scenarios.split(",") for b in args.backends.split(",")]
    print("| scenario | backend | dtype | tokens | adapters | prepare ms | apply ms (30 layers x 4 groups) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['scenario']} | {r['backend']} | {r['dtype']} | {r['tokens']} | {r['adapters']} | "
              f"{r['prepare_ms']:.2f} | {r['apply_ms']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
