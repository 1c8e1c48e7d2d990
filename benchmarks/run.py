"""``python -m benchmarks.run [--quick]``: the machine's limits, then every scenario on every system.

First the machine is measured in the same run (benchmarks/machine.py: GEMM peak of the prepacked
path at decode and prefill shapes, read bandwidth) and the LoRA kernel against it
(benchmarks/lora_kernels.py); every scenario row is then read against those figures. Each job
(probe, or system x scenario x repeat) runs in a fresh subprocess (benchmarks/worker.py, or the vLLM
venv's python for vLLM), never two at once: on 2 cores a second busy process distorts any
measurement. Results: markdown tables and the targets on stdout, JSON and PNG plots in
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import report
from benchmarks.metrics import cpu_note
from benchmarks.model_dir import ensure_serving_dir
from benchmarks.scenarios import FAMILIES, Plan, cold_adapters, family, plans
from benchmarks.workload import make_requests, save_requests, workload_tokens

log = logging.getLogger("benchmarks")
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
SERVING_DIR = CACHE / "smollm2-serving-fp32"  # the default model as safetensors: fast to load per job
JOB_TIMEOUT_S = 1200  # one (system, scenario) run: a hung peer must not stall the benchmark
# Systems that are another system with other settings: (the worker's system, extra job fields).
VARIANTS = {"ours_nocache": {"engine_overrides": {"enable_prefix_caching": False}}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="small scenarios, no vLLM: < 3 minutes")
    p.add_argument("--repeat", type=int, default=None, help="runs per measurement (default 2, quick 1)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: what the server picks here (bfloat16 with AMX, else float32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the system under test")
    p.add_argument("--systems", default="ours,ours_nocache,http,hf_peft,vllm", help="comma-separated subset")
    p.add_argument("--scenarios", default=None, help="comma-separated subset of scenario names")
    p.add_argument("--no-cold-hot", action="store_true", help="skip the cold-vs-hot TTFT measurement")
    p.add_argument("--all-peers", action="store_true",
                   help="run vLLM and transformers+PEFT in every scenario, not just where targets need them")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="suffix of the result file names (e.g. before/after)")
    return p.parse_args(argv)


def prepare_adapters(needed: set[str]) -> dict[str, Path]:
    """Generate (once) and return the root dir of each adapter family in ``needed``."""
    import json

    import torch

    from benchmarks.adapters import ensure_adapters
    from server.model_config import ModelConfig

    # The serving dir's config.json is the GGUF's metadata as written by ensure_serving_dir; parsing
    # the GGUF again (its ~50k-entry token arrays) cost 2-3 s of every benchmark run.
    cfg = ModelConfig.from_hf_dict(json.loads((ensure_serving_dir(SERVING_DIR) / "config.json").read_text()))
    roots = {name: ensure_adapters(CACHE / "adapters" / name, family(name), cfg, torch.bfloat16)
             for name in sorted(needed) if name in FAMILIES}
    marker = CACHE / "adapters" / ".validated"
    if not marker.exists():  # once per cache: a few of each family must load in peft itself
        from benchmarks.adapters import validate_with_peft
        from benchmarks.systems.hf_peft import load_base

        dirs = [roots[f] / s.adapter_id for f in roots for s in family(f)[3:5]]
        validate_with_peft(load_base(torch.float32), dirs)
        marker.touch()
    return roots


def _ours_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "GOMP_SPINCOUNT": "20000"}


def _run(name: str, cmd: list[str], env: dict[str, str], out_path: Path) -> dict | None:
    """Run one subprocess (its own process group); the JSON it wrote, or None (logged) if it failed."""
    note = cpu_note()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        proc.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # kill the whole group: vLLM leaves engine-core children
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.error("%s failed: over %d s (killed)", name, JOB_TIMEOUT_S)
        return None
    if proc.returncode != 0 or not out_path.is_file():
        log.error("%s failed (exit %d)", name, proc.returncode)
        return None
    result = json.loads(out_path.read_text())
    if isinstance(result, dict):
        result.update(load_before=note, elapsed_s=time.perf_counter() - start)
    return result


def store_dir(peft_root: Path) -> Path:
    from benchmarks.adapters import store_dir as of

    return of(peft_root)


def run_job(job: dict, workdir: Path) -> dict | None:
    """Run one (system, scenario, repeat) job in a subprocess; its result dict, or None if it failed."""
    name = f"{job['scenario']['name']}-{job['system']}-{job.get('kind', 'tp')}-{job['repeat']}"
    job_path, out_path = workdir / f"{name}.job.json", workdir / f"{name}.out.json"
    job_path.write_text(json.dumps(job))
    if job["system"] == "vllm":
        cmd = [str(VLLM_PY), "-m", "benchmarks.systems.vllm_worker", str(job_path), str(out_path)]
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4",
               "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"), "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "1800"}
    else:
        cmd = [sys.executable, "-m", "benchmarks.worker", str(job_path), str(out_path)]
        env = _ours_env(job["threads"])
    result = _run(name, cmd, env, out_path)
    if result is not None:
        log.info("%s: %.1f tok/s (%s)", name, result.get("tok_s", 0.0), result["load_before"])
    return result


def measure_machine(args: argparse.Namespace, workdir: Path) -> tuple[dict | None, dict | None]:
    """The machine's limits, and the LoRA kernel against them, each in its own process."""
    limits_path, kernels_path = workdir / "machine.json", workdir / "lora_kernels.json"
    limits = _run("machine", [sys.executable, "-m", "benchmarks.machine", "--threads", str(args.threads),
                              "--out", str(limits_path)], _ours_env(args.threads), limits_path)
    if limits:
        log.info("machine: %s", report.machine_line(limits))
    kernels = _run("lora_kernels", [sys.executable, "-m", "benchmarks.lora_kernels", "--backends", "native",
                                    "--scenarios", "decode-a64-qkvo", "--storage", f"{args.dtype},bfloat16",
                                    "--dtype", args.dtype, "--threads", str(args.threads),
                                    "--repeat", "6" if args.quick else "12", "--out", str(kernels_path)],
                   _ours_env(args.threads), kernels_path)
    return limits, kernels


def base_job(args: argparse.Namespace, plan: Plan, roots: dict[str, Path], workdir: Path) -> dict:
    """The job of a scenario (any system): its requests on disk, its adapters, the common settings.
    Our engine and server size their pool by default (a fraction of the available memory)."""
    sc = plan.scenario
    specs = family(plan.family)[: sc.num_adapters] if plan.family else []
    requests = make_requests(sc, specs)
    req_path = workdir / f"{sc.name}.requests.json"
    save_requests(req_path, requests)
    root = roots.get(plan.family or "", workdir / "no-adapters" / "peft")
    used = sorted({r.adapter_id for r in requests if r.adapter_id})
    tokens, sampled = workload_tokens(requests)
    return {"scenario": sc.to_json(), "requests": str(req_path), "adapter_root": str(root),
            "adapter_store": str(store_dir(root)),
            "dtype": args.dtype, "threads": args.threads, "max_num_seqs": sc.max_num_seqs,
            "peft_batch": 32, "warm_adapters": used if sc.warm else used[:1],
            "adapter_ranks": {s.adapter_id: s.rank for s in specs if s.adapter_id in used},
            "workload_tokens": tokens, "workload_sampled": sampled,
            "model_dir": str(CACHE / "smollm2-hf"), "serving_dir": str(SERVING_DIR)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.dtype == "auto":  # every system gets the same concrete dtype
        import torch

        from server.hardware import resolve_dtype

        args.dtype = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
        log.info("dtype auto -> %s", args.dtype)
    repeat = args.repeat or (1 if args.quick else 2)
    systems = set(args.systems.split(","))
    if "vllm" in systems and not VLLM_PY.exists():
        log.warning("no .venv-vllm (run `make bench-peers`): vLLM-CPU is skipped")
        systems.discard("vllm")
    wanted = args.scenarios.split(",") if args.scenarios else None
    chosen = [p for p in plans(args.quick, args.all_peers) if wanted is None or p.scenario.name in wanted]
    roots = prepare_adapters({p.family for p in chosen if p.family} | {"k2"})  # makes SERVING_DIR too
    if "vllm" in systems:
        from benchmarks.model_dir import ensure_hf_dir

        ensure_hf_dir(CACHE / "smollm2-hf")
    results: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        limits, kernels = measure_machine(args, workdir)
        for plan in chosen:
            job = base_job(args, plan, roots, workdir)
            for system in [s for s in plan.systems if s in systems]:
                for r in range(repeat):
                    res = run_job({**job, **VARIANTS.get(system, {}), "system": system, "repeat": r}, workdir)
                    results.append({"scenario": plan.scenario.name, "system": system, "repeat": r,
                                    "num_adapters": plan.scenario.num_adapters, "warm": plan.scenario.warm,
                                    "workload_tokens": job["workload_tokens"],
                                    "workload_sampled": job["workload_sampled"], "result": res})
        cold_hot = {} if args.no_cold_hot else measure_cold_hot(args, roots, workdir, systems, repeat)
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "repeat": repeat,
            "scenarios": [asdict(p.scenario) for p in chosen], "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": limits, "lora_kernels": kernels, "page_fill": report.page_fill(FAMILIES),
            "wall_s": time.perf_counter() - started}
    report.write_all(args.out, args.tag or ("quick" if args.quick else "full"), meta, results, cold_hot)
    return 0


def measure_cold_hot(args: argparse.Namespace, roots: dict[str, Path], workdir: Path, systems: set[str],
                     repeat: int) -> dict[str, list[dict]]:
    """Cold (disk-only adapter) vs hot TTFT of a lone request, for our server (P5's system) and, in
    the full run, our engine in-process."""
    plan = Plan(plans(args.quick)[0].scenario, "k2", ())
    job = {**base_job(args, plan, roots, workdir), "kind": "cold_hot",
           "cold_adapters": cold_adapters(args.quick)}
    out: dict[str, list[dict]] = {}
    for system in ("http",) if args.quick else ("ours", "http"):
        if system in systems:
            runs = [run_job({**job, "system": system, "repeat": r}, workdir) for r in range(repeat)]
            out[system] = [r for r in runs if r is not None]
    return out


if __name__ == "__main__":
    sys.exit(main())
