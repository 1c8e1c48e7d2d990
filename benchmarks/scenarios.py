"""The scenarios of ``make bench`` (full) and ``make bench-quick``, and which systems run each.

Adapter families (generated once, cached under ``benchmarks/.cache``):
* ``mix``: ranks cycling 8, 16, 32, 64; every other group of four targets all seven linear modules,
  the rest q, k, v, o (the "64 adapters of mixed ranks" scenario and the PEFT comparison).
* ``k2``: 2,000 adapters of ranks 8 and 16 on q, k, v, o (bf16 files: 5.5 GB on disk; the full
  rank mix on seven modules would be ~25 GB). The 8-adapter scenario draws from the same family so
  that "2,000 vs 8 adapters" compares like with like: only the number of distinct adapters differs.

``prefix8`` is a chat workload: every prompt is one 512-token system prompt plus its own user turn,
over 8 adapters and the base model. ``ours`` (prefix caching on, the default) and ``ours_nocache``
run the same requests in the same run; vLLM-CPU (full run only) has its prefix caching on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from benchmarks.workload import AdapterSpec, Scenario, adapter_specs

FAMILIES: dict[str, tuple[int, tuple[int, ...], int]] = {  # name: (count, ranks, all_modules_every)
    "mix": (64, (8, 16, 32, 64), 2),
    "k2": (2000, (8, 16), 0),
}


def family(name: str) -> list[AdapterSpec]:
    count, ranks, every = FAMILIES[name]
    return adapter_specs(count, ranks, every, prefix=name)


@dataclass(frozen=True)
class Plan:
    """A scenario, its adapter family and the systems that run it."""

    scenario: Scenario
    family: str | None
    systems: tuple[str, ...]


def plans(quick: bool, all_peers: bool = False) -> list[Plan]:
    """Full: our engine and server everywhere; the peers where a target needs them (vLLM on a64,
    transformers+PEFT on peft32) and on the base scenario as a reference, or everywhere with
    ``all_peers`` (on a 2-core AVX2 CPU one peer run with adapters takes 5-12 minutes: vLLM-CPU
    made 5.6 tok/s on the quick a64 requests). Quick (for regressions): fewer and shorter
    requests, the HTTP server on the base scenario only, no vLLM (~25 s start-up each)."""
    # Quick: shorter prompts too; on an AVX2-only CPU (fp32, ~90 GFLOP/s) 32 prompts of 32-128
    # tokens alone took ~8 s of prefill per job, 5.5 minutes in all.
    n, prompt, out = (32, (16, 64), (12, 24)) if quick else (64, (32, 128), (48, 80))
    common = dict(num_requests=n, prompt_len=prompt, output_len=out)
    peers = ("ours", "http", "hf_peft", "vllm")
    ours = ("ours",) if quick else ("ours", "http")
    result = [
        Plan(Scenario("base", **common), None, peers),
        Plan(Scenario("a8", num_adapters=8, **common), "k2", peers if all_peers else ours),
        Plan(Scenario("a64", num_adapters=64, **common), "mix", peers if all_peers else (*ours, "vllm")),
        Plan(Scenario("a2000", num_adapters=2000, **common), "k2",
             (*ours, "vllm") if all_peers else ours),
        # The PEFT comparison: 32 concurrent requests over the 64 mixed adapters, PEFT batch 32.
        Plan(Scenario("peft32", num_adapters=64, num_requests=32, prompt_len=prompt, output_len=out,
                      max_num_seqs=32, seed=1), "mix", ("ours", "hf_peft")),
    ]
    # Quick: 16 chats, ~20 s of prefill without the cache on a 2-core AVX2 CPU; full: 48.
    chats = dict(num_requests=16, prompt_len=(16, 32), output_len=(8, 16)) if quick else \
        dict(num_requests=48, prompt_len=(16, 64), output_len=(16, 32))
    result.append(Plan(Scenario("prefix8", num_adapters=8, with_base=True, shared_prefix_len=512, **chats),
                       "k2", ("ours", "ours_nocache", "vllm")))
    if not quick:
        result.append(Plan(Scenario("poisson64", num_adapters=64, choice="powerlaw", rate=2.0,
                                    **common), "mix", ("ours", "http")))
    if quick:
        result = [replace(p, systems=tuple(s for s in p.systems if s not in ("vllm", "hf_peft")
                                           or p.scenario.name == "peft32")) for p in result]
    return result


def cold_adapters(quick: bool) -> list[str]:
    """Never-requested adapters of the k2 family, for the cold-vs-hot TTFT measurement."""
    specs = family("k2")
    return [s.adapter_id for s in specs[-(3 if quick else 6):]]

