"""The kernel backends a model runner uses, each chosen once at start-up as an object.

``select_backend`` picks the model's non-GEMM ops (attention, KV store, RoPE, norms, SiLU): the fused C
ops on CPU when they build (``native``), Triton attention on CUDA, else the torch references, and holds
them as plain function attributes, so the hot path calls ``backend.paged_attention(...)`` with no
per-call branching. ``select_lora_backend`` returns the ``LoraBackend`` object (kernels/lora_backend.py) the
runner holds. The Triton modules are imported here, lazily, and only when asked for: the package must
import on machines where triton cannot run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import model_native
from kernels.attention import AttnMeta, paged_attention_ref, store_kv_ref
from kernels.lora_backend import LoraBackend
from kernels.lora_native import NATIVE_DTYPES, NativeLoraBackend
from kernels.lora_torch import TorchLoraBackend
from kernels.native_lib import available as native_available
from server import layers
from server.page_layout import PageLayout

StoreKvFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
PagedAttentionFn = Callable[[torch.Tensor, torch.Tensor, AttnMeta, int, float], torch.Tensor]
NormFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
AddNormFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, float], torch.Tensor]

BACKENDS = ("torch", "native", "triton")
LORA_BACKENDS = ("torch", "native", "triton")


@dataclass(frozen=True)
class KernelBackend:
    """One implementation of the model's non-GEMM ops; signatures and semantics are the references'
    (kernels/attention.py, server/layers.py).

    store_kv(kv_pages, k [T,KVH,D], v [T,KVH,D], slot_mapping [T]) -> None
    rope_store_kv(qkv [T,(H+2KVH)D], rope, kv_pages, slot_mapping, H, KVH) -> q [T,H,D]  (RoPE, then store)
    paged_attention(q [T,H,D], kv_pages, meta, layer, scale) -> [T,H,D]
    rms_norm(x [T,N], w, eps) -> [T,N];  add_rms_norm(h, delta | None, w, eps): h += delta, then rms_norm
    silu_mul(gate_up [T,2I]) -> [T,I]
    """

    name: str
    store_kv: StoreKvFn
    rope_store_kv: Callable[..., torch.Tensor]
    paged_attention: PagedAttentionFn
    rms_norm: NormFn
    add_rms_norm: AddNormFn
    silu_mul: Callable[[torch.Tensor], torch.Tensor]


def _torch_backend(name: str, store_kv: StoreKvFn, paged_attention: PagedAttentionFn) -> KernelBackend:
    return KernelBackend(name, store_kv, layers.rope_store_kv_with(store_kv), paged_attention,
                         layers.rms_norm, layers.add_rms_norm, layers.swiglu)


def native_ops_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused C ops can run here (a CPU, fp32 or bf16, a C compiler)."""
    return device.type == "cpu" and dtype in model_native.NATIVE_DTYPES and native_available()


def select_backend(device: torch.device, name: str | None = None,
                   dtype: torch.dtype = torch.float32) -> KernelBackend:
    """``name`` ("torch" | "native" | "triton") overrides the default: "triton" on CUDA, "native"
    (the fused C ops) on a CPU where they build for ``dtype``, else "torch"."""
    if name is None:
        name = "triton" if device.type == "cuda" else ("native" if native_ops_ok(device, dtype) else "torch")
    if name == "torch":
        return _torch_backend("torch", store_kv_ref, paged_attention_ref)
    if name == "native":
        if not native_ops_ok(device, dtype):
            raise ValueError(f"the native ops need a CPU, a dtype in {model_native.NATIVE_DTYPES} "
                             "and a C compiler")
        m = model_native
        return KernelBackend("native", store_kv_ref, m.rope_store_kv, m.paged_attention_native, m.rms_norm,
                             m.add_rms_norm, m.silu_mul)
    if name == "triton":
        from kernels.triton_attention import paged_attention_triton, store_kv_triton

        return _torch_backend("triton", store_kv_triton, paged_attention_triton)
    raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")


def lora_backend_name(device: torch.device, dtype: torch.dtype, kernel_backend: str,
                      name: str | None = None) -> str:
    """Which LoRA implementation to use: ``name`` if given, else "triton" with the Triton kernel
    backend, else "native" (the C kernel) on CPU when it builds for this dtype, else "torch"."""

    def native_ok() -> bool:  # a function: available() builds the kernel, only when it may be used
        return device.type == "cpu" and dtype in NATIVE_DTYPES and native_available()

    if name is None:
        if kernel_backend == "triton":
            return "triton"
        return "native" if native_ok() else "torch"
    if name not in LORA_BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; expected one of {LORA_BACKENDS}")
    if name == "native" and not native_ok():
        raise ValueError(f"the native LoRA kernel needs a CPU, a dtype in {NATIVE_DTYPES} and a C compiler")
    return name


def select_lora_backend(arena: torch.Tensor, layout: PageLayout, kernel_backend: str,
                        name: str | None = None) -> LoraBackend:
    """The LoRA backend object over ``arena`` (see ``lora_backend_name`` for the choice)."""
    name = lora_backend_name(arena.device, arena.dtype, kernel_backend, name)
    if name == "triton":
        from kernels.triton_lora import TritonLoraBackend

        return TritonLoraBackend(arena, layout)
    if name == "native":
        return NativeLoraBackend(arena, layout)
    return TorchLoraBackend(arena, layout)
