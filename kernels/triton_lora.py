"""Triton LoRA shrink/expand that read ``A`` and ``B^T`` in place from the arena's pages.

Same semantics as ``kernels.lora.lora_shrink_ref`` / ``lora_expand_ref``. Work is cut into tiles of
``BLOCK_M`` rows of one segment; only segments with tokens and an adapter that has the module get
tiles, so a step with one long prefill segment and many decode tokens launches no idle programs.
Row ``j`` of a slot's matrix is read at
``arena + page_table[slot, j // rpp] * page_elems + (j % rpp) * row_len + k``; each program masks by
its own slot's rank, so mixed ranks share one launch without padding the weights.

This is the only module that imports triton; ``kernels.lora`` imports it lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.lora import LoraArgs

BLOCK_M = 16  # tl.dot needs >= 16 rows; decode segments are 1 token, so bigger tiles waste work
# Triton 3.9's interpreter returns garbage from tl.dot on bf16 operands (fp16/fp32 are fine), so under
# the interpreter the operands are upcast to fp32 first; compiled kernels keep the native dot.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class _Tables:
    tile_seg: torch.Tensor  # [num_tiles] int32: segment of each tile
    tile_row: torch.Tensor  # [num_tiles] int32: first row of each tile
    seg_ends: torch.Tensor  # [S] int32
    seg_slots: torch.Tensor  # [S] int32
    ranks: torch.Tensor  # [num_slots] int32, 0 where the slot lacks this module
    scales: torch.Tensor  # [num_slots] float32
    a_pages: torch.Tensor  # [num_slots, max_a_pages] int32, padded with 0
    b_pages: torch.Tensor  # [num_slots, max_b_pages] int32


def _page_table(rows: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    return torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=device)


def _tables(args: LoraArgs, device: torch.device) -> _Tables:
    """Device tensors for one call, built once per (args, device) and kept on ``args``."""
    key = ("triton", device)
    if key in args._memo:
        return args._memo[key]  # type: ignore[return-value]
    seg = args.segments
    ranks = [m.rank if m is not None else 0 for m in args.mats]
    tiles = [
        (s, row)
        for s, slot in enumerate(seg.seg_slots)
        if slot >= 0 and ranks[slot] > 0
        for row in range(seg.seg_starts[s], seg.seg_starts[s + 1], BLOCK_M)
    ]

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    tables = _Tables(
        tile_seg=i32([t[0] for t in tiles]),
        tile_row=i32([t[1] for t in tiles]),
        seg_ends=i32(list(seg.seg_starts[1:])),
        seg_slots=i32(list(seg.seg_slots)),
        ranks=i32(ranks),
        scales=torch.tensor(
            [m.scale if m is not None else 0.0 for m in args.mats], dtype=torch.float32, device=device
        ),
        a_pages=_page_table([m.a_pages if m is not None else () for m in args.mats], device),
        b_pages=_page_table([m.b_pages if m is not None else () for m in args.mats], device),
    )
    args._memo[key] = tables
    return tables


@triton.jit
def _shrink_kernel(
    x_ptr, arena_ptr, v_ptr,
    tile_seg_ptr, tile_row_ptr, seg_ends_ptr, seg_slots_ptr, ranks_ptr, a_pages_ptr,
    K, page_elems, rpp, a_pages_stride, stride_xm, stride_xk, stride_vm, stride_vr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + tile)
    slot = tl.load(seg_slots_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    r0 = tl.program_id(1) * BLOCK_R
    if r0 >= rank:
        return
    offs_m = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    m_mask = offs_m < tl.load(seg_ends_ptr + seg)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    pages = tl.load(a_pages_ptr + slot * a_pages_stride + offs_r // rpp, mask=r_mask, other=0)
    row_base = pages.to(tl.int64) * page_elems + (offs_r % rpp) * K
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        at = tl.load(
            arena_ptr + row_base[None, :] + offs_k[:, None],
            mask=k_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            xt, at = xt.to(tl.float32), at.to(tl.float32)
        acc += tl.dot(xt, at, input_precision=PRECISION)
    v_ptrs = v_ptr + offs_m[:, None] * stride_vm + offs_r[None, :] * stride_vr
    tl.store(v_ptrs, acc.to(v_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(
    v_ptr, arena_ptr, y_ptr,
    tile_seg_ptr, tile_row_ptr, seg_ends_ptr, seg_slots_ptr, ranks_ptr, scales_ptr, b_pages_ptr,
    N, page_elems, rpp, b_pages_stride, stride_vm, stride_vr, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + tile)
    slot = tl.load(seg_slots_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    offs_m = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    m_mask = offs_m < tl.load(seg_ends_ptr + seg)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        vt = tl.load(
            v_ptr + offs_m[:, None] * stride_vm + offs_r[None, :] * stride_vr,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        pages = tl.load(b_pages_ptr + slot * b_pages_stride + offs_r // rpp, mask=r_mask, other=0)
        row_base = pages.to(tl.int64) * page_elems + (offs_r % rpp) * N
        bt = tl.load(
            arena_ptr + row_base[:, None] + offs_n[None, :],
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            vt, bt = vt.to(tl.float32), bt.to(tl.float32)
        acc += tl.dot(vt, bt, input_precision=PRECISION)
    scale = tl.load(scales_ptr + slot)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=mask)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    """fp32 serving must match the fp32 reference (PEFT), so no TF32 for fp32 (nor for the
    interpreter's upcast bf16, which is exact in fp32); for native bf16/fp16 operands it is ignored."""
    upcast = _INTERPRET and dtype == torch.bfloat16
    return {"PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}


def lora_shrink_triton(x: torch.Tensor, arena: torch.Tensor, args: LoraArgs) -> torch.Tensor:
    """``x [T, K] -> v [T, R]``: ``v[t, :r_a] = x[t] @ A_a.T``, zeros elsewhere (see ``lora_shrink_ref``)."""
    rank_max = args.max_rank
    v = x.new_zeros(x.shape[0], rank_max)
    t = _tables(args, x.device)
    if t.tile_seg.numel() == 0 or rank_max == 0:
        return v
    mat = next(m for m in args.mats if m is not None)
    block_r, block_k = _block(rank_max, 16, 64), _block(mat.in_features, 16, 64)
    grid = (t.tile_seg.numel(), triton.cdiv(rank_max, block_r))
    _shrink_kernel[grid](
        x, arena, v, t.tile_seg, t.tile_row, t.seg_ends, t.seg_slots, t.ranks, t.a_pages,
        mat.in_features, arena.shape[1], arena.shape[1] // mat.in_features, t.a_pages.stride(0),
        x.stride(0), x.stride(1), v.stride(0), v.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=block_k, **_dot_options(x.dtype),
    )  # fmt: skip
    return v


def lora_expand_triton(v: torch.Tensor, arena: torch.Tensor, args: LoraArgs, y: torch.Tensor) -> None:
    """``y[t] += scale_a * v[t, :r_a] @ B_a.T`` in place (see ``lora_expand_ref``); ``y`` may be strided."""
    t = _tables(args, v.device)
    if t.tile_seg.numel() == 0 or args.max_rank == 0:
        return
    mat = next(m for m in args.mats if m is not None)
    block_r, block_n = _block(args.max_rank, 16, 32), _block(mat.out_features, 16, 64)
    grid = (t.tile_seg.numel(), triton.cdiv(mat.out_features, block_n))
    _expand_kernel[grid](
        v, arena, y, t.tile_seg, t.tile_row, t.seg_ends, t.seg_slots, t.ranks, t.scales, t.b_pages,
        mat.out_features, arena.shape[1], arena.shape[1] // mat.out_features, t.b_pages.stride(0),
        v.stride(0), v.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_N=block_n, **_dot_options(v.dtype),
    )  # fmt: skip
