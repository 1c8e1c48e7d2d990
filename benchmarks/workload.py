"""S-LoRA-style synthetic workloads: which adapter, how long a prompt and output, when it arrives.

Plain data only (stdlib): the vLLM worker runs in another venv and imports this module too.
Requests carry token ids, not text, so every system sees exactly the same prompts, and
``max_tokens`` with EOS ignored, so every system generates exactly the same number of tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

RANKS = (8, 16, 32, 64)
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_MODULES = ATTN_MODULES + ("gate_proj", "up_proj", "down_proj")
# Token ids drawn for prompts: skip the low ids, where SmolLM2 keeps its special tokens.
PROMPT_TOKEN_RANGE = (200, 40_000)


@dataclass(frozen=True)
class AdapterSpec:
    """One synthetic adapter: its id, rank and target modules."""

    adapter_id: str
    rank: int
    targets: tuple[str, ...]


@dataclass(frozen=True)
class RequestSpec:
    """One request; ``arrival`` is seconds after the start (0 for a closed loop)."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    adapter_id: str | None
    arrival: float = 0.0


@dataclass(frozen=True)
class Scenario:
    """A workload: N adapters of ranks from ``ranks``, requests choosing among them."""

    name: str
    num_requests: int
    num_adapters: int = 0  # 0 = base model only
    ranks: tuple[int, ...] = RANKS
    all_modules_every: int = 2  # every k-th adapter targets all seven modules, the rest q,k,v,o
    choice: str = "uniform"  # uniform | powerlaw | cycle (request i takes adapter i mod N: N distinct)
    powerlaw_alpha: float = 1.0
    prompt_len: tuple[int, int] = (32, 128)  # uniform in [lo, hi]
    output_len: tuple[int, int] = (48, 80)
    rate: float | None = None  # Poisson arrivals per second; None = all at once (closed loop)
    shared_prefix_len: int = 0  # tokens of one "system prompt" every request starts with
    with_base: bool = False  # requests choose among the adapters and the base model
    warm: bool = False  # every adapter is used once before the timed run (resident in every system)
    max_num_seqs: int = 64
    seed: int = 0
    tags: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def adapter_specs(n: int, ranks: tuple[int, ...] = RANKS, all_modules_every: int = 2,
                  prefix: str = "bench") -> list[AdapterSpec]:
    """``n`` adapters cycling through ``ranks``; every ``all_modules_every``-th targets all modules.

    Deterministic in ``n``: adapter ``i`` is the same in every scenario, so one cache serves all.
    """
    out = []
    for i in range(n):
        rank = ranks[i % len(ranks)]
        targets = ALL_MODULES if all_modules_every and (i // len(ranks)) % all_modules_every else ATTN_MODULES
        out.append(AdapterSpec(f"{prefix}-{i:04d}-r{rank}-{len(targets)}m", rank, targets))
    return out


def _choose(rng: random.Random, n: int, choice: str, alpha: float, i: int) -> int:
    if choice == "cycle":
        return i % n
    if choice == "uniform":
        return rng.randrange(n)
    if choice == "powerlaw":
        weights = [1.0 / (k + 1) ** alpha for k in range(n)]
        return rng.choices(range(n), weights=weights)[0]
    raise ValueError(f"unknown adapter choice {choice!r}")


def make_requests(sc: Scenario, adapters: list[AdapterSpec]) -> list[RequestSpec]:
    """The scenario's requests, reproducible from its seed. With ``shared_prefix_len`` every prompt
    is one shared system prompt followed by its own ``prompt_len`` tokens (a chat workload)."""
    rng = random.Random(sc.seed)
    system = random.Random(sc.seed + 1).choices(range(*PROMPT_TOKEN_RANGE), k=sc.shared_prefix_len)
    choices: list[str | None] = [a.adapter_id for a in adapters[: sc.num_adapters]]
    if sc.with_base or not choices:
        choices.append(None)
    t = 0.0
    out = []
    for i in range(sc.num_requests):
        plen = rng.randint(*sc.prompt_len)
        prompt = system + [rng.randint(*PROMPT_TOKEN_RANGE) for _ in range(plen)]
        pick = _choose(rng, len(choices), sc.choice, sc.powerlaw_alpha, i) if len(choices) > 1 else 0
        adapter = choices[pick]
        if sc.rate:
            t += rng.expovariate(sc.rate)
        out.append(RequestSpec(f"{sc.name}-{i}", prompt, rng.randint(*sc.output_len), adapter, t))
    return out


def workload_tokens(requests: list[RequestSpec]) -> tuple[int, int]:
    """(tokens a model computes, rows it samples) to serve ``requests``: each prompt and every output
    token but the last goes through the layers; every output token is sampled."""
    return (sum(len(r.prompt_ids) + r.max_tokens - 1 for r in requests), sum(r.max_tokens for r in requests))


def save_requests(path: Path, requests: list[RequestSpec]) -> None:
    path.write_text(json.dumps([asdict(r) for r in requests]))


def load_requests(path: Path) -> list[RequestSpec]:
    return [RequestSpec(**d) for d in json.loads(path.read_text())]
