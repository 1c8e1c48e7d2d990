"""Runs one system on one scenario in a fresh process: ``python -m benchmarks.worker JOB.json OUT.json``.

A process per measurement keeps systems from sharing warm caches or heap, and makes peak RSS mean
that system's peak. The job (JSON) names the system, the requests file and the settings.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from benchmarks.workload import load_requests


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    system, kind = job["system"], job.get("kind", "throughput")
    if system in ("ours", "ours_nocache"):  # ours_nocache: engine_overrides in the job
        from benchmarks.systems import ours as mod
    elif system == "http":
        from benchmarks.systems import http as mod
    elif system == "hf_peft":
        from benchmarks.systems import hf_peft as mod
    else:
        raise ValueError(f"unknown system {system!r}")
    if kind == "cold_hot":
        result = mod.cold_vs_hot(job, job["cold_adapters"])
    else:
        result = mod.run(job, load_requests(Path(job["requests"])))
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main(sys.argv[1], sys.argv[2])
