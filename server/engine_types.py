"""Plain data the engine hands out: request outputs, adapter info, stats. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]
AdapterLocation = Literal["disk", "host", "device"]


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """One streamed increment of a request. ``new_text`` concatenated over outputs is the text."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    error: Exception | None = None  # set on a request the engine ended for a fault (finish_reason "abort")


@dataclass(frozen=True)
class StepInfo:
    """What one engine step computed; ``LLMEngine.last_step`` (the benchmark reads it)."""

    num_tokens: int
    num_decode: int  # sequences that computed exactly one token
    num_sampled: int  # rows that went through the LM head
    num_running: int
    adapters: int  # distinct adapters among the step's tokens
    adapter_bytes: int  # their weights in the pool: what the step's LoRA kernels stream
    seconds: float  # the runner's part: tensors, forward, sampling


@dataclass(frozen=True)
class AdapterPart:
    """One part of an adapter's weights as the pool holds them.

    ``name``: ``"layers"`` (LoRA on the layers' linear modules), ``"embed_tokens"``, ``"lm_head"``
    (LoRA on the embedding / the LM head) or ``"dora_scale"`` (DoRA's per-output scales of every
    DoRA module). ``bytes``: its weights in its storage dtype; ``pool_bytes``: the page rows they take
    (parts share the adapter's pages: server/adapter_info.py).
    ``full_copy``: the part holds a whole embedding / head (``modules_to_save``, or a saved base
    layer other than the base model's), stored as a module of rank ``hidden`` (+ its LoRA's rank).
    """

    name: str
    modules: tuple[str, ...]
    rank: int  # the largest rank over its modules (0 for dora_scale)
    bytes: int
    pool_bytes: int
    full_copy: bool = False


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    uid: int  # unique per upload; a re-added name gets a new uid
    rank: int  # the largest rank over its modules
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    checksum: str
    location: AdapterLocation
    requests_served: int
    created: float
    use_dora: bool = False
    parts: tuple[AdapterPart, ...] = ()  # empty if the adapter's config cannot be read
    pool_bytes: int = 0  # pages it takes in the pool when resident (all parts)
    vocab_size: int = 0  # token ids its requests may use: the base's, or more with added tokens


@dataclass(frozen=True)
class PrefixCacheInfo:
    """Prefix-cache counters (tokens, as vLLM counts them) and gauges (blocks)."""

    enabled: bool = False
    queries: int = 0  # prompt tokens of admitted requests looked up (not counting recomputations)
    hits: int = 0  # of those, tokens found cached
    preempted_queries: int = 0  # the same for requests readmitted after preemption
    preempted_hits: int = 0
    blocks: int = 0  # cached KV blocks (a block is one page per layer)
    blocks_evictable: int = 0  # of those, blocks no request reads
    blocks_dropped: int = 0  # blocks of deleted or replaced adapter versions, dropped at once


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    pool_pages_total: int
    pool_pages_free: int  # allocatable now: empty, or parked (unreferenced cached KV, idle adapters)
    pool_pages_kv: int  # KV blocks of running requests (shared cached blocks included)
    pool_pages_adapter: int
    page_bytes: int
    adapters_resident: int  # on device (in pool pages)
    adapters_host: int  # in the host cache
    adapters_stored: int  # on disk
    adapter_loads_total: int
    adapter_evictions_total: int
    host_cache_bytes: int
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    max_loras: int = 0
    preemptions_total: int = 0
    pool_pages_empty: int = 0  # holding nothing
    pool_pages_cached: int = 0  # cached KV blocks no request reads (reclaimable)
    prefix_cache: PrefixCacheInfo = field(default_factory=PrefixCacheInfo)
    evictions: dict[str, int] = field(default_factory=dict)  # pressure evictions by unit kind
    adapter_load_failures: dict[str, int] = field(default_factory=dict)  # by reason (adapter_failures)
