"""Where and in what the engine runs: the device, the serving dtype, the pool's memory budget.

``dtype="auto"`` on a CPU is bfloat16 only with AMX (Sapphire Rapids and later): there a bf16 GEMM
runs on the tile units, several times fp32. Elsewhere it is float32, which also keeps greedy tokens
identical to transformers in fp32. On an AVX2-only CPU bf16 matmuls are emulated (~6x slower than
fp32: 15 vs 90 GFLOP/s measured). With AVX-512 BF16 but no AMX (AMD Zen 4) oneDNN computes bf16
GEMMs natively but at most ~2x fp32's rate in theory, and in a decode step of 64 requests on 2 cores
bf16 measured no faster overall (the figures are in docs/internals.md; ``make bench`` prints both
dtypes' GEMM peaks in every run). The rule is a fixed function of the CPU's flags, not a timing at
start-up, so the same machine always serves in the same dtype.
"""

from __future__ import annotations

import torch

from kernels.native_lib import cpu_flags
from server.config import EngineConfig
from server.memory import available_bytes, pool_budget


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_prefers_bf16() -> bool:
    """AMX tiles and a oneDNN that runs bf16 natively (see the module docstring)."""
    return "amx_bf16" in cpu_flags() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``name`` as a torch dtype; "auto": bf16 (fp16 without bf16) on CUDA, and on a CPU see
    ``cpu_prefers_bf16``."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_prefers_bf16() else torch.float32


def pool_budget_for(config: EngineConfig, device: torch.device) -> tuple[int, str]:
    """The pool's bytes and how they were set: ``pool_bytes`` if given, else ``pool_memory_fraction``
    of the memory available now (the device's free memory on CUDA; server/memory.py on a host)."""
    if config.pool_bytes is not None:
        return config.pool_bytes, "pool_bytes"
    fraction = config.pool_memory_fraction
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = available_bytes()
    return pool_budget(fraction, free), f"{fraction:g} of {free / 2**30:.1f} GiB available"
