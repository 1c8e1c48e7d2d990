"""Helpers for engine tests: run requests to completion, and transformers greedy oracles."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from server.engine import LLMEngine
from server.sampling_params import SamplingParams


def tiny_llama_dir(out: Path, tokenizer_dir: Path, seed: int = 0, **config) -> tuple[Path, LlamaForCausalLM]:
    """Save a small random Llama (GQA by default) as an HF dir with SmolLM2's tokenizer files.

    ``config`` overrides LlamaConfig fields (e.g. num_key_value_heads, tie_word_embeddings,
    rope_scaling); returns the dir and the transformers model, the oracle.
    """
    torch.manual_seed(seed)
    fields = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
    model = LlamaForCausalLM(LlamaConfig(**{**fields, **config})).eval()
    model.save_pretrained(out, max_shard_size="100KB")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out, model


def run_all(engine: LLMEngine, prompts: dict[str, list[int]], params: SamplingParams,
            adapters: dict[str, str | None] | None = None, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Submit every prompt at once (they share batches) and step until all finish."""
    adapters = adapters or {}
    for rid, ids in prompts.items():
        engine.add_request(ids, params, adapters.get(rid), request_id=rid)
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    assert not engine.has_work()
    return tokens


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation by full re-forward (no cache), and the logits at the last prompt position."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    first_logits = None
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[0, -1].float()
            if first_logits is None:
                first_logits = logits
            nxt = int(logits.argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, first_logits


def engine_logits(engine: LLMEngine, prompt: list[int], adapter: str | None = None) -> torch.Tensor:
    """The logits our engine computes at the last prompt position, captured at the real sampler."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    return run_all_logits(engine, {"logits": prompt}, params, {"logits": adapter})[1]["logits"]


def run_all_logits(engine: LLMEngine, prompts: dict[str, list[int]], params: SamplingParams,
                   adapters: dict[str, str | None] | None = None
                   ) -> tuple[dict[str, list[int]], dict[str, torch.Tensor], list[list[str]]]:
    """``run_all``, also capturing at the real sampler each request's logits at its last prompt
    position (its first sample) and which requests each step sampled together."""
    first: dict[str, torch.Tensor] = {}
    steps: list[list[str]] = []
    seen: list[torch.Tensor] = []
    runner, sampler = engine.runner, engine.runner.sampler
    execute, sample = runner.execute, sampler.sample

    def spy_sample(logits, *args, **kwargs):
        seen.append(logits.clone())
        return sample(logits, *args, **kwargs)

    def spy_execute(*args, **kwargs):
        seen.clear()
        out = execute(*args, **kwargs)
        if out:  # rows in the order they were sampled (runner.execute zips them in order)
            (logits,) = seen
            steps.append(list(out))
            for row, rid in enumerate(out):
                first.setdefault(rid, logits[row])
        return out

    runner.execute, sampler.sample = spy_execute, spy_sample
    try:
        tokens = run_all(engine, prompts, params, adapters)
    finally:
        runner.execute, sampler.sample = execute, sample
    return tokens, first, steps
