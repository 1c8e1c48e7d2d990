"""What DoRA costs against the same LoRA adapter, in one run: kernels, loading, pool bytes, decoding.

``python -m benchmarks.dora [--threads 2] [--repeat 20] [--rounds 3]``

Every DoRA adapter here is a LoRA adapter (same A, B, rank, alpha, modules) plus the magnitude
vectors, so the ratios isolate what DoRA adds:

* **kernels**: the LoRA part of one step at SmolLM2's shapes (30 layers x 4 module groups, ranks
  8-64 on all seven modules), per backend, with and without the DoRA epilogue (its scale row read
  and multiplied into every output row);
* **adapter**: SmolLM2, one rank-16 adapter on all seven modules: host load (parse + validation;
  for DoRA the scales ``m / ||W0 + s B A||`` from the base's row norms and a rank-row forward),
  copy into pool pages, pool bytes;
* **decode**: the engine (SmolLM2, fp32) decoding ``--requests`` concurrent greedy requests over
  ``--adapters`` distinct adapters, LoRA runs and DoRA runs alternated ``--rounds`` times.

The machine may be shared with other work: only the same-run ratios mean something, and a quiet
machine gives steadier ones. Prints tables; writes ``benchmarks/results/dora.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapter_store.peft_format import CONFIG_NAME, WEIGHTS_NAME
from benchmarks.adapters import ensure_adapters
from benchmarks.lora_kernels import SCENARIOS, SMOLLM2, make_arena
from benchmarks.workload import ALL_MODULES, AdapterSpec
from kernels.backend import select_lora_backend
from kernels.lora import LoraSegments
from kernels.step_buffer import StepBuffer, StepPack
from server.adapter_residency import AdapterResidency
from server.config import EngineConfig
from server.engine import LLMEngine
from server.model_config import ModelConfig
from server.page_layout import PageLayout
from server.pool import PagePool
from server.sampling_params import SamplingParams

log = logging.getLogger("benchmarks.dora")
ROOT = Path(__file__).resolve().parent.parent


def _interleaved_ms(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each function, calling them in turn (A, B, A, B, ...) so that both see the same
    machine: on a shared machine, back-to-back blocks of A then B would compare different loads."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeat + warmup):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def kernel_step(backend_name: str, scenario: str, dora: bool) -> Callable[[], None]:
    """The LoRA part of one step (``apply`` for every layer and group), as a function to time."""
    cfg = ModelConfig.from_hf_dict(SMOLLM2)
    layout = PageLayout.for_model(cfg)
    per_seg, num_adapters, modules = SCENARIOS[scenario]
    arena, tables = make_arena(cfg, layout, num_adapters, torch.float32, modules, dora=dora)  # g rows near 1
    backend = select_lora_backend(arena, layout, "torch", backend_name)
    seg_starts = tuple(range(0, per_seg * num_adapters + 1, per_seg))
    segments = LoraSegments(seg_starts, tuple(range(num_adapters)))
    groups = cfg.lora_groups()
    xs = {g.name: torch.randn(seg_starts[-1], g.in_features) for g in groups}
    ys = {g.name: torch.zeros(seg_starts[-1], g.out_features) for g in groups}
    pack = StepPack()
    step = backend.prepare_step(segments, tables, pack)
    step.bind(StepBuffer(arena.device).upload(pack))

    def run() -> None:
        for layer in range(cfg.num_layers):
            for g in groups:
                step.apply(layer, g, xs[g.name], ys[g.name])

    return run


def make_pair(root: Path, name: str, engine: LLMEngine) -> tuple[Path, Path]:
    """A rank-16 seven-module LoRA adapter and the same adapter as DoRA (magnitudes ``||W0||`` per
    output row, perturbed by up to 10%: DoRA scales near 1, outputs sane)."""
    spec = AdapterSpec(name, 16, ALL_MODULES)
    lora = ensure_adapters(root, [spec], engine.model_config) / name
    dora = root / f"{name}-dora"
    dora.mkdir(exist_ok=True)
    tensors = load_file(lora / WEIGHTS_NAME)
    gen = torch.Generator().manual_seed(len(name))
    for key in [k for k in tensors if k.endswith("lora_B.weight")]:
        prefix = key.removesuffix(".lora_B.weight")
        layer, module = int(prefix.split(".")[4]), prefix.split(".")[-1]
        norm = engine.runner.model.base.row_norms_sq(layer, module).sqrt().float()
        noise = 0.95 + 0.1 * torch.rand(norm.shape, generator=gen)
        tensors[f"{prefix}.lora_magnitude_vector"] = norm * noise
    save_file(tensors, dora / WEIGHTS_NAME, metadata={"format": "pt"})
    config = json.loads((lora / CONFIG_NAME).read_text())
    (dora / CONFIG_NAME).write_text(json.dumps({**config, "use_dora": True}))
    return lora, dora


def adapter_costs(engine: LLMEngine, lora: Path, dora: Path, repeat: int) -> dict:
    out: dict[str, dict] = {"lora": {}, "dora": {}}
    parse, write = {}, {}
    for kind, path in (("lora", lora), ("dora", dora)):
        parsed = engine.adapters.parse(path)
        info = engine.add_adapter(f"cost-{kind}", path)
        spec = engine.adapters.resolve(f"cost-{kind}").spec
        table = AdapterResidency(PagePool(spec.pages_needed(engine.layout)), engine.layout).load(spec)
        parse[kind] = lambda p=path: engine.adapters.parse(p)
        write[kind] = lambda t=table, w=parsed.weights: engine.runner.write_adapter(t, w)
        out[kind] |= {"pool_bytes": info.pool_bytes, "host_bytes": parsed.nbytes}
    for key, fns in (("host_load_ms", parse), ("pool_write_ms", write)):
        for kind, ms in _interleaved_ms(fns, repeat).items():
            out[kind][key] = ms
    return out


def decode_tok_s(engine: LLMEngine, adapters: list[str], requests: int, tokens: int) -> float:
    """Generated tokens per second of ``requests`` concurrent greedy requests over ``adapters``."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i in range(requests):
        prompt = [200 + (7 * i + j) % 30000 for j in range(16)]
        engine.add_request(prompt, params, adapters[i % len(adapters)], request_id=f"r{i}")
    start = time.perf_counter()
    made = 0
    while engine.has_work():
        made += sum(len(o.new_token_ids) for o in engine.step())
    return made / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backends", default="native,torch")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dora.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    kernels = [{"backend": b, "scenario": s, **_interleaved_ms(
        {k: kernel_step(b, s, k == "dora_ms") for k in ("lora_ms", "dora_ms")}, args.repeat)}
        for s in SCENARIOS for b in args.backends.split(",")]
    print("| scenario | backend | LoRA ms/step | DoRA ms/step | DoRA / LoRA |\n|---|---|---|---|---|")
    for r in kernels:
        print(f"| {r['scenario']} | {r['backend']} | {r['lora_ms']:.2f} | {r['dora_ms']:.2f} | "
              f"{r['dora_ms'] / r['lora_ms']:.3f} |")
    with tempfile.TemporaryDirectory() as tmp:
        engine = LLMEngine(EngineConfig(dtype="float32", num_threads=args.threads, pool_bytes=1 << 30,
                                        adapter_store_dir=str(Path(tmp) / "store")))
        pairs = [make_pair(Path(tmp) / "src", f"bench{i}", engine) for i in range(args.adapters)]
        costs = adapter_costs(engine, *pairs[0], max(args.repeat // 4, 3))
        for i, (lora, dora) in enumerate(pairs):
            engine.add_adapter(f"lora{i}", lora)
            engine.add_adapter(f"dora{i}", dora)
        names = {k: [f"{k}{i}" for i in range(args.adapters)] for k in ("lora", "dora")}
        for kind in names:  # warm-up: every adapter read, placed in the pool, kernels built
            decode_tok_s(engine, names[kind], args.adapters, 2)
        decode = {"lora": [], "dora": []}
        for _ in range(args.rounds):
            for kind in decode:
                decode[kind].append(decode_tok_s(engine, names[kind], args.requests, args.tokens))
    print("\n| adapter (SmolLM2, r16, 7 modules) | LoRA | DoRA | DoRA / LoRA |\n|---|---|---|---|")
    for key in ("host_load_ms", "pool_write_ms", "host_bytes", "pool_bytes"):
        lo, do = costs["lora"][key], costs["dora"][key]
        print(f"| {key} | {lo:.1f} | {do:.1f} | {do / lo:.3f} |")
    lo, do = statistics.median(decode["lora"]), statistics.median(decode["dora"])
    print(f"\n| decode ({args.requests} requests x {args.tokens} tokens over {args.adapters} adapters) | "
          f"LoRA | DoRA | DoRA / LoRA |\n|---|---|---|---|\n| tok/s (median of {args.rounds}) | "
          f"{lo:.1f} | {do:.1f} | {do / lo:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "kernels": kernels, "adapter": costs,
                                    "decode_tok_s": decode}, indent=2))


if __name__ == "__main__":
    main()
