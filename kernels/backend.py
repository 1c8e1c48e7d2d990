"""The kernel backend: which implementation of each tensor op a model runner uses.

Chosen once at start-up (torch references on CPU, Triton on CUDA) and held as plain function
attributes, so the hot path calls ``backend.paged_attention(...)`` with no per-call branching.
The Triton modules are imported here, lazily, and only when asked for: the package must import on
machines where triton cannot run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.attention import AttnMeta, paged_attention_ref, store_kv_ref
from kernels.lora import LoraArgs, lora_expand_ref, lora_shrink_ref

StoreKvFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
PagedAttentionFn = Callable[[torch.Tensor, torch.Tensor, AttnMeta, int, float], torch.Tensor]
LoraShrinkFn = Callable[[torch.Tensor, torch.Tensor, LoraArgs], torch.Tensor]
LoraExpandFn = Callable[[torch.Tensor, torch.Tensor, LoraArgs, torch.Tensor], None]

BACKENDS = ("torch", "triton")
LORA_BACKENDS = ("torch", "native", "triton")


@dataclass(frozen=True)
class KernelBackend:
    """One implementation of every op; signatures and semantics are those of the torch references.

    store_kv(kv_pages, k [T,KVH,D], v [T,KVH,D], slot_mapping [T]) -> None
    paged_attention(q [T,H,D], kv_pages, meta, layer, scale) -> [T,H,D]
    lora_shrink(x [T,K], arena, args) -> v [T,R];  lora_expand(v [T,R], arena, args, y [T,N]) -> None
    """

    name: str
    store_kv: StoreKvFn
    paged_attention: PagedAttentionFn
    lora_shrink: LoraShrinkFn
    lora_expand: LoraExpandFn


def select_backend(device: torch.device, name: str | None = None) -> KernelBackend:
    """``name`` ("torch" | "triton") overrides the default: "triton" on CUDA, "torch" elsewhere."""
    if name is None:
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return KernelBackend("torch", store_kv_ref, paged_attention_ref, lora_shrink_ref, lora_expand_ref)
    if name == "triton":
        from kernels.triton_attention import paged_attention_triton, store_kv_triton
        from kernels.triton_lora import lora_expand_triton, lora_shrink_triton

        return KernelBackend("triton", store_kv_triton, paged_attention_triton, lora_shrink_triton,
                             lora_expand_triton)
    raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")


def select_lora_backend(device: torch.device, dtype: torch.dtype, kernel_backend: str,
                        name: str | None = None) -> str:
    """The LoRA implementation ``LoraBatch`` runs: ``name`` if given, else "triton" with the Triton
    backend, else "native" (the C kernel, kernels/lora_native.py) on CPU when it builds for this
    dtype, else "torch"."""
    from kernels.lora_native import NATIVE_DTYPES, available

    def native_ok() -> bool:  # a function: available() builds the kernel, only when it may be used
        return device.type == "cpu" and dtype in NATIVE_DTYPES and available()

    if name is None:
        if kernel_backend == "triton":
            return "triton"
        return "native" if native_ok() else "torch"
    if name not in LORA_BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; expected one of {LORA_BACKENDS}")
    if name == "native" and not native_ok():
        raise ValueError(f"the native LoRA kernel needs a CPU, a dtype in {NATIVE_DTYPES} and a C compiler")
    return name
