"""The base model's fused CPU ops (kernels/model_native.c) behind the signatures of their references.

Each function computes exactly what its reference does (same rounding points in bf16; fp32 differs
only in summation order), reading its operands in place and making one C call:

* ``add_rms_norm``  ~ ``h += delta; return rms_norm(h, w, eps)``           (server/layers.py)
* ``silu_mul``      ~ ``swiglu(gate_up)``                                   (server/layers.py)
* ``rope_store_kv`` ~ ``apply_rope`` on q and k in place, then ``store_kv_ref`` (kernels/attention.py)
* ``paged_attention_native`` ~ ``paged_attention_ref``: decode rows and prefill chunks over short
  contexts in C straight from the pages; chunks whose queries see many keys (a long prompt's later
  chunks) keep the reference's one SDPA call per sequence, where a GEMM-shaped kernel catches up
  with the C kernel's query-at-a-time loop.

Everything is host memory; the ops need contiguous rows (unit column stride) in fp32 or bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention import AttnMeta, PrefillPlan, prefill_attention, prefill_plan
from kernels.native_lib import library
from server.layers import RopeTables

NATIVE_DTYPES = (torch.float32, torch.bfloat16)
# A query run at least this long whose queries see more than this many keys on average goes to SDPA
# over its gathered pages; any other run to the C kernel. SDPA's gather and per-sequence call cost
# more than the C kernel's whole work on short contexts. 30 layers' worth of one call, 2 cores,
# fp32, SmolLM2's heads, C against SDPA: 64 prompts of 24 tokens 1.0 against 12.1 ms, 16 of 48
# 0.8 against 5.7, 2 of 512 10.2 against 17.7; 8 chunks of 32 on 368 cached tokens (a mean of 384.5
# keys per query) 3.6 against 6.8, 2 of 128 on 384 cached (448.5) 4.6 against 5.5; at 512 it went
# either way (1 chunk of 256 on 384 cached: 6.6 against 6.0; 1 of 512 on 256: 13.8 against 23.2),
# and 1 chunk of 128 on 600 cached (664.5) took 4.5 against 4.2.
SDPA_MIN_QUERIES = 16
SDPA_MIN_MEAN_KEYS = 480  # between the last shape C won (448.5) and the first that went either way (512.5)
MAX_HEAD_DIM = 512
CPU = torch.device("cpu")


class NativeOpError(RuntimeError):
    """A C op could not allocate its work buffers."""


def _lib():
    lib = library()
    if lib is None:
        raise NativeOpError("the CPU C kernels are not available")
    return lib


def _code(t: torch.Tensor) -> int:
    if t.dtype not in NATIVE_DTYPES:
        raise ValueError(f"native ops take {NATIVE_DTYPES}, got {t.dtype}")
    return int(t.dtype == torch.bfloat16)


def _rows(t: torch.Tensor) -> int:
    """Row stride of a 2-D operand whose rows are contiguous."""
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"expected 2-D rows with unit column stride, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")
    return t.stride(0)


def _check(rc: int, op: str) -> None:
    if rc != 0:
        raise NativeOpError(f"{op}: out of memory for its work buffers")


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """``h += delta`` in place (if given), then ``rms_norm(h, weight, eps)`` as a new ``[T, H]`` tensor."""
    t, hidden = h.shape
    out = torch.empty(t, hidden, dtype=h.dtype)
    if delta is not None and (delta.shape != h.shape or delta.dtype != h.dtype):
        raise ValueError("delta must match h")
    w = weight.contiguous()
    rc = _lib().add_rms_norm(_code(h), h.data_ptr(), _rows(h), None if delta is None else delta.data_ptr(),
                             0 if delta is None else _rows(delta), w.data_ptr(), out.data_ptr(), hidden, t,
                             hidden, eps, torch.get_num_threads())
    _check(rc, "add_rms_norm")
    return out


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return add_rms_norm(h, None, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` ``[T, 2I]`` -> ``[T, I]``."""
    t, two_i = gate_up.shape
    out = torch.empty(t, two_i // 2, dtype=gate_up.dtype)
    rc = _lib().silu_mul(_code(gate_up), gate_up.data_ptr(), _rows(gate_up), out.data_ptr(), two_i // 2, t,
                         two_i // 2, torch.get_num_threads())
    _check(rc, "silu_mul")
    return out


def rope_store_kv(qkv: torch.Tensor, rope: RopeTables, kv_pages: torch.Tensor, slot_mapping: torch.Tensor,
                  num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """RoPE on the q and k heads of ``qkv [T, (H + 2 KVH) D]`` in place, then K and V into their slots;
    returns the roped ``q [T, H, D]`` (a view of ``qkv``).

    ``kv_pages [num_pages, 2, block_size, KVH, D]`` contiguous, ``slot_mapping [T]`` int32 (-1 skips).
    """
    t = qkv.shape[0]
    _, _, block_size, kvh, d = kv_pages.shape
    if kvh != num_kv_heads or qkv.shape[1] != (num_heads + 2 * kvh) * d or d > MAX_HEAD_DIM:
        raise ValueError("qkv, kv_pages and the head counts disagree")
    if kv_pages.dtype != qkv.dtype or not kv_pages.is_contiguous() or slot_mapping.dtype != torch.int32:
        raise ValueError("kv_pages must be contiguous in qkv's dtype; slot_mapping int32")
    pos = rope.positions
    rc = _lib().rope_store_kv(_code(qkv), qkv.data_ptr(), _rows(qkv), t, num_heads, kvh, d, pos.data_ptr(),
                              rope.cos_table.data_ptr(), rope.sin_table.data_ptr(), kv_pages.data_ptr(),
                              slot_mapping.contiguous().data_ptr(), block_size, torch.get_num_threads())
    _check(rc, "rope_store_kv")
    return qkv[:, : num_heads * d].view(t, num_heads, d)


@dataclass(frozen=True)
class NativePlan:
    """Which sequences of a step the C kernel takes (short query runs) and the SDPA prefills."""

    short: torch.Tensor  # int64 sequence indices
    cu_q_lens: torch.Tensor  # int32 [S + 1], from the host copies (whatever the meta's tensors are)
    ctx_lens: torch.Tensor  # int32 [S]
    prefills: tuple[PrefillPlan, ...]


def _plan(meta: AttnMeta, block_size: int, dtype: torch.dtype) -> NativePlan:
    cu, ctx = meta.host_cu_q_lens, meta.host_ctx_lens
    short, prefills = [], []
    for s, ctx_len in enumerate(ctx):
        q_len = cu[s + 1] - cu[s]
        if q_len <= 0:
            continue
        if q_len < SDPA_MIN_QUERIES or ctx_len - (q_len - 1) / 2 <= SDPA_MIN_MEAN_KEYS:
            short.append(s)
        else:
            prefills.append(prefill_plan(s, cu[s], cu[s + 1], ctx_len, block_size, dtype, CPU))
    return NativePlan(torch.tensor(short, dtype=torch.int64), torch.tensor(cu, dtype=torch.int32),
                      torch.tensor(ctx, dtype=torch.int32), tuple(prefills))


def paged_attention_native(q: torch.Tensor, kv_pages: torch.Tensor, meta: AttnMeta, layer: int,
                           scale: float) -> torch.Tensor:
    """``paged_attention_ref``'s semantics: ``q [T, H, D]`` (rows may be strided) -> ``[T, H, D]``."""
    t, h, d = q.shape
    _, _, block_size, kvh, _ = kv_pages.shape
    if q.stride(2) != 1 or q.stride(1) != d or h % kvh:
        raise ValueError("q must have contiguous heads; heads must be a multiple of KV heads")
    plan = meta.cached(("native", block_size, q.dtype), lambda: _plan(meta, block_size, q.dtype))
    out = torch.empty(t, h, d, dtype=q.dtype)
    block_table = meta.block_tables[layer]
    if block_table.dtype != torch.int32 or not block_table.is_contiguous():
        block_table = block_table.to(torch.int32).contiguous()
    if plan.short.numel():
        rc = _lib().paged_attention(
            _code(q), q.data_ptr(), q.stride(0), out.data_ptr(), h * d, kv_pages.data_ptr(),
            block_table.data_ptr(), block_table.shape[1], plan.cu_q_lens.data_ptr(), plan.ctx_lens.data_ptr(),
            plan.short.data_ptr(), plan.short.numel(), h, kvh, d, block_size, scale, torch.get_num_threads())
        _check(rc, "paged_attention")
    if plan.prefills:
        table = block_table.long()
        for p in plan.prefills:
            out[p.q_start : p.q_end] = prefill_attention(q, kv_pages, table, p, scale)
    return out
