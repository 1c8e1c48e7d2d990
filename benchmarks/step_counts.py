"""Launch, transfer and sync counts of one decode step and one mixed step, on a model of a given shape.

``TRITON_INTERPRET=1 python -m benchmarks.step_counts [--shape smollm2|tiny] [--adapters 64]
[--run-kernels]`` builds a ``ModelRunner`` on a random-weight Llama of that shape with the Triton
kernel and LoRA backends, writes ``--adapters`` random adapters (ranks cycling 8/16, all seven
modules) into its pages, runs one warm-up step, then counts (benchmarks/step_counter.py) a decode
step (one token for each adapter's request plus two base requests) and a mixed step (the same
decodes plus two prefill chunks). Prints a table and writes JSON. Without ``--run-kernels`` the
Triton kernels are counted but not executed, which keeps the interpreter from taking minutes on
SmolLM2's shape; nothing counted depends on kernel results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from benchmarks.step_counter import StepCounter

log = logging.getLogger("benchmarks.step_counts")
ROOT = Path(__file__).resolve().parent.parent

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}


# ---- a synthetic runner: random weights, random adapters, hand-made scheduler outputs ---------


def random_weights(cfg, dtype, seed: int = 0) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    w = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h, std=1.0), "model.norm.weight": rnd(h) + 1,
         "lm_head.weight": rnd(cfg.vocab_size, h)}
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        w |= {p + "input_layernorm.weight": rnd(h) + 1, p + "post_attention_layernorm.weight": rnd(h) + 1,
              p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
              p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
              p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
              p + "mlp.down_proj.weight": rnd(h, i)}
    return w


@dataclass
class Setup:
    runner: object
    pool: object
    layout: object
    tables: dict  # uid -> AdapterPageTable
    next_id: int = 0


def build_setup(shape: dict, num_adapters: int, kernel_backend: str = "triton", lora_backend: str = "triton",
                dtype_name: str = "float32", pool_pages: int | None = None, ranks: tuple[int, ...] = (8, 16),
                seed: int = 0) -> Setup:
    """A runner with ``num_adapters`` random adapters (all modules, ``ranks`` cycling) in its pages."""
    import torch

    from adapter_store.peft_format import LoraWeights
    from kernels.backend import select_backend
    from server.adapter_residency import AdapterResidency, AdapterSpec, ModuleSpec
    from server.model_config import LORA_MODULES, ModelConfig
    from server.page_layout import PageLayout
    from server.pool import PagePool
    from server.runner import ModelRunner

    dtype = getattr(torch, dtype_name)
    cfg = ModelConfig.from_hf_dict({**shape, "rms_norm_eps": 1e-5})
    layout = PageLayout.for_model(cfg, itemsize=dtype.itemsize)
    shapes = cfg.linear_shapes()
    specs = []
    for n in range(num_adapters):
        r = ranks[n % len(ranks)]
        mods = {(layer, m): ModuleSpec(r, 2.0, *shapes[m]) for layer in range(cfg.num_layers)
                for m in LORA_MODULES}
        specs.append(AdapterSpec(uid=1000 + n, name=f"a{n}", modules=mods))
    need = sum(s.pages_needed(layout) for s in specs) + 12 * (num_adapters + 4) * cfg.num_layers  # + KV
    num_pages = pool_pages or need
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights = {k: v.to(device) for k, v in random_weights(cfg, dtype, seed).items()}
    runner = ModelRunner(cfg, weights, layout, num_pages, select_backend(device, kernel_backend, dtype),
                         cfg.max_position_embeddings, lora_backend=lora_backend)
    pool = PagePool(num_pages)
    residency = AdapterResidency(pool, layout)
    gen = torch.Generator().manual_seed(seed + 1)
    tables = {}
    for spec in specs:
        table = residency.load(spec)
        weights = {key: LoraWeights(torch.randn(m.rank, m.in_features, generator=gen).to(dtype) * 0.05,
                                    torch.randn(m.out_features, m.rank, generator=gen).to(dtype) * 0.05,
                                    m.rank, m.scale) for key, m in spec.modules.items()}
        runner.write_adapter(table, weights)
        tables[spec.uid] = table
    return Setup(runner, pool, layout, tables)


def make_output(setup: Setup, decodes: list[tuple[int | None, int]], prefills: list[tuple[int | None, int]]):
    """A SchedulerOutput: ``decodes`` = (adapter uid, context length) -> one new token each at the end
    of that context; ``prefills`` = (adapter uid, prompt length) -> the whole prompt as one chunk."""
    from server.scheduler import ScheduledChunk, SchedulerOutput

    layers, bs = setup.layout.num_layers, setup.layout.block_size
    chunks = []
    for uid, n_tokens, start in [(u, 1, ctx - 1) for u, ctx in decodes] + [(u, n, 0) for u, n in prefills]:
        blocks = -(-(start + n_tokens) // bs)
        pages = setup.pool.allocate(blocks * layers, "kv")
        table = [pages[layer::layers] for layer in range(layers)]
        rid = f"r{setup.next_id}"
        setup.next_id += 1
        tokens = [(7 * setup.next_id + j) % 200 + 1 for j in range(n_tokens)]
        chunks.append(ScheduledChunk(rid, tokens, start, table, uid, True))
    return SchedulerOutput(chunks=chunks)


def count_steps(setup: Setup, run_kernels: bool, decode_ctx: int = 20, prefill_len: int = 24) -> dict:
    """Counts of one decode step and one mixed prefill + decode step."""
    from server.runner import RowContext
    from server.sampling_params import SamplingParams

    uids = list(setup.tables)
    row = RowContext(SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), None, ())
    decodes = [(u, decode_ctx) for u in uids] + [(None, decode_ctx), (None, decode_ctx + 3)]
    prefills = [(uids[0] if uids else None, prefill_len), (None, prefill_len // 2)]
    out = {}
    with StepCounter(setup.runner, run_kernels) as counter:
        # Warm-up, not counted: the first step sizes the runner's reusable buffers.
        setup.runner.execute(make_output(setup, decodes, prefills), setup.tables.__getitem__, lambda rid: row)
        for name, sched in (("decode", make_output(setup, decodes, [])),
                            ("mixed", make_output(setup, decodes, prefills))):
            counts = counter.measure_execute(sched, setup.tables.__getitem__, lambda rid: row)
            out[name] = {"step": counts.step.as_dict(), "forward": counts.forward.as_dict()}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--run-kernels", action="store_true", help="execute the Triton kernels (slow on CPU)")
    p.add_argument("--lora-backend", default="triton")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_counts.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1")
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    setup = build_setup(shape, args.adapters, lora_backend=args.lora_backend)
    result = count_steps(setup, args.run_kernels)
    meta = {"shape": args.shape, "layers": shape["num_hidden_layers"], "adapters": args.adapters,
            "lora_backend": args.lora_backend, "kernels_executed": args.run_kernels}
    rows = ["| step | part | Triton launches | h2d | host tensors | syncs | torch ops |",
            "|---|---|---|---|---|---|---|"]
    for step, parts in result.items():
        for part, c in parts.items():
            rows.append(f"| {step} | {part} | {c['num_launches']} | {c['h2d']} | {c['host_tensors']} | "
                        f"{c['syncs']} | {c['torch_ops']} |")
    print(json.dumps(meta))
    print("\n".join(rows))
    for step, parts in result.items():
        print(step, "launches by kernel:", dict(sorted(parts["step"]["launches"].items())))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "counts": result}, indent=2))


if __name__ == "__main__":
    main()
