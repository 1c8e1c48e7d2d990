"""System (c): transformers + PEFT, mixed-adapter batches via ``generate(adapter_names=...)``.

This is the S-LoRA paper's baseline, made stronger: PEFT mixes adapters within one batch (the
paper's PEFT ran one adapter at a time). Requests are taken in order in static batches of
``peft_batch``, left-padded; each batch decodes to its longest request (EOS suppressed with
``min_new_tokens``) and only the tokens each request asked for are counted.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from benchmarks.metrics import RequestTiming, self_peak_rss, summarize
from benchmarks.workload import RequestSpec
from server.loader import default_model_path

log = logging.getLogger(__name__)
BASE = "__base__"  # PEFT's adapter name for "no adapter" in adapter_names


class _StepClock(LogitsProcessor):
    """Records the wall time of every decoding step (called once per generated token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def load_base(dtype: torch.dtype, serving_dir: str | None = None) -> torch.nn.Module:
    """SmolLM2 in transformers: from the harness's safetensors copy when given (the same weights,
    dequantized once; seconds instead of re-reading the GGUF), else from the GGUF file."""
    if serving_dir:
        return AutoModelForCausalLM.from_pretrained(serving_dir, dtype=dtype).eval()
    path = Path(default_model_path())
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def load_model(job: dict, adapters: list[str]) -> torch.nn.Module:
    """The base with every adapter of ``adapters`` loaded under its own name."""
    model = load_base(getattr(torch, job["dtype"]), job.get("serving_dir"))
    if not adapters:
        return model
    from peft import PeftModel

    root = job["adapter_root"]
    model = PeftModel.from_pretrained(model, f"{root}/{adapters[0]}", adapter_name=adapters[0])
    for name in adapters[1:]:
        model.load_adapter(f"{root}/{name}", adapter_name=name)
    return model.eval()


def _batch(model: torch.nn.Module, batch: list[RequestSpec], use_names: bool,
           rec: dict[str, RequestTiming]) -> None:
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    n = max(r.max_tokens for r in batch)
    clock = _StepClock()
    extra = {"adapter_names": [r.adapter_id or BASE for r in batch]} if use_names else {}
    sent = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]),
                       **extra)
    for r in batch:
        rec[r.request_id] = RequestTiming(sent, clock.times[: r.max_tokens], r.max_tokens)


def run(job: dict, requests: list[RequestSpec]) -> dict:
    torch.set_num_threads(job["threads"])
    names = sorted({r.adapter_id for r in requests if r.adapter_id})
    start_load = time.perf_counter()
    model = load_model(job, names)
    log.info("transformers+PEFT: loaded %d adapters in %.1f s", len(names), time.perf_counter() - start_load)
    size = job["peft_batch"]
    _batch(model, [RequestSpec("warmup", list(range(300, 340)), 2, names[0] if names else None)],
           bool(names), {})
    rec: dict[str, RequestTiming] = {}
    start = time.perf_counter()
    for i in range(0, len(requests), size):
        _batch(model, requests[i : i + size], bool(names), rec)
    result = summarize(list(rec.values()), time.perf_counter() - start, self_peak_rss())
    result["settings"] = f"static batches of {size}, {len(names)} adapters loaded before timing"
    return result
