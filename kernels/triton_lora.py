"""The Triton LoRA backend: fused multi-adapter shrink/expand reading ``A`` and ``B^T`` in place from pages.

Per layer and module group (q/k/v, o, gate/up, down) there is one shrink launch and one expand
launch covering every adapter of the step, instead of one shrink, one expand and one zero-fill per
(layer, module): ``8 * num_layers`` LoRA launches per step, whatever the number of adapters and the
mix of decode and prefill. Program ``(tile, module[, column block])`` reads its tile's adapter
block (see kernels/lora_meta.py) and exits at once if the adapter lacks that (layer, module) or the
tile is padding. Each adapter is computed at its own rank (the loops over rank rows stop at it).
A program picks its tile shape from its row count: a decode-shaped tile (1-4 rows of one segment)
multiplies and sums in fp32 without ``tl.dot`` (BGMV-like); a prefill-shaped tile (16 rows) uses
``tl.dot`` (SGMV). Both shapes are compiled into each kernel, so a mixed step needs no second launch.

Semantics (kernels.lora.lora_group_ref): for module ``m`` of the group and token ``t`` of adapter ``a``::

    shrink:  v[t, m * R + j] = x[t] @ A_{a,m}[j]                       j < rank_{a,m}
    expand:  y[t, cols_m + n] += scale_{a,m} * sum_j v[t, m * R + j] * B^T_{a,m}[j, n]

and for a DoRA module the expand's epilogue multiplies the sum by ``g_{a,m}[n]``. The embed_tokens
group's shrink is a row lookup (``x`` holds token ids: ``v[t, j] = A^T[x[t], j]``); the lm_head
group's rows are the sample rows (their own tile list) and its ``B^T`` rows, vocab-long, are
stored in page-long pieces (a program's column block lies in one piece).

``v`` is an fp32 scratch owned by the backend (``R``: the step's largest rank); ``y`` is read and
written once per element in fp32 and rounded once. ``tl.dot`` takes fp32 operands in IEEE
precision (to match the fp32 reference) and bf16/fp16 operands natively.

This is the only LoRA module that imports triton; ``kernels.backend`` imports it lazily.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from kernels.lora import LoraSegments
from kernels.lora_backend import NO_LORA, LoraBackend, LoraStep
from kernels.lora_meta import HDR_FIELDS, SGMV_BLOCK_M, AdapterBlock, Tiles, adapter_block, plan_tiles
from kernels.lora_pages import AdapterWeights
from kernels.page_writer import PageWriter
from kernels.step_buffer import StepPack
from server.model_config import GATHER, KERNEL_MODULES, LM_HEAD, MODEL_MODULES, SAMPLES, LoraGroup
from server.page_layout import AdapterPageTable, PageLayout

MAX_GROUP = 3  # modules per group (q/k/v); v holds MAX_GROUP * R columns
BLOCK_N = 64  # output columns per expand program
# Triton 3.9's interpreter returns garbage from tl.dot on bf16 operands (fp16/fp32 are fine), so under
# the interpreter the prefill kernels' dot operands are upcast to fp32 first; compiled kernels keep the
# native dot. The decode kernels use no tl.dot and run the GPU code path everywhere.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _shrink_tile(
    x_ptr, arena_ptr, v_ptr, desc_ptr, a_list, a_row0, rank, row0, row_end, v_col, K, page_elems,
    stride_xm, stride_xk, stride_vm,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``v[t, v_col + j] = x[t] @ A[j]`` for the tile's rows and ``j < rank``."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    rpp = page_elems // K
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        idx = a_row0 + offs_r  # rows of several matrices share pages (server/adapter_packing.py)
        pages = tl.load(desc_ptr + a_list + idx // rpp, mask=r_mask, other=0)
        row_base = pages.to(tl.int64) * page_elems + (idx % rpp) * K
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(arena_ptr + row_base[None, :] + offs_k[:, None],
                         mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            if USE_DOT:
                if UPCAST:
                    xt, at = xt.to(tl.float32), at.to(tl.float32)
                acc += tl.dot(xt, at, input_precision=PRECISION)
            else:
                acc += tl.sum(xt.to(tl.float32)[:, :, None] * at.to(tl.float32)[None, :, :], axis=1)
        v_ptrs = v_ptr + offs_m[:, None] * stride_vm + (v_col + offs_r)[None, :]
        tl.store(v_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _gather_tile(
    x_ptr, arena_ptr, v_ptr, desc_ptr, a_list, a_row0, rank, row0, row_end, v_col, page_elems, stride_xm,
    stride_vm, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``v[t, v_col + j] = A^T[x[t], j]`` for the tile's rows (``x``: token ids; rows of ``rank``)."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    ids = a_row0 + tl.load(x_ptr + offs_m * stride_xm, mask=m_mask, other=0).to(tl.int64)
    rpp = page_elems // rank
    pages = tl.load(desc_ptr + a_list + ids // rpp, mask=m_mask, other=0)
    row_base = pages.to(tl.int64) * page_elems + (ids % rpp) * rank
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = m_mask[:, None] & (offs_r < rank)[None, :]
        a = tl.load(arena_ptr + row_base[:, None] + offs_r[None, :], mask=mask, other=0.0)
        tl.store(v_ptr + offs_m[:, None] * stride_vm + (v_col + offs_r)[None, :], a.to(tl.float32), mask=mask)


@triton.jit
def _tile_header(tiles_ptr, desc_ptr, layer, module, NUM_MODULES: tl.constexpr, HDR: tl.constexpr):
    """This program's tile: ``(first row, end row, adapter block start, header word, rank)``.

    ``rank`` is 0 when there is nothing to do: a padding tile, or an adapter without (layer, module).
    """
    tile = tl.program_id(0)
    base = tl.load(tiles_ptr + tile * 3 + 2)
    hdr = base + (layer * NUM_MODULES + module) * HDR
    rank = tl.load(desc_ptr + hdr, mask=base >= 0, other=0)
    return tl.load(tiles_ptr + tile * 3), tl.load(tiles_ptr + tile * 3 + 1), base, hdr, rank


@triton.jit
def _shrink_kernel(
    x_ptr, arena_ptr, v_ptr, tiles_ptr, desc_ptr,
    layer, K, page_elems, stride_xm, stride_xk, stride_vm, v_mod,
    NUM_MODULES: tl.constexpr, HDR: tl.constexpr, FIRST: tl.constexpr, SHORT_M: tl.constexpr,
    LONG_M: tl.constexpr, BLOCK_R_SHORT: tl.constexpr, BLOCK_R_LONG: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(1)
    row0, row_end, base, hdr, rank = _tile_header(tiles_ptr, desc_ptr, layer, FIRST + m, NUM_MODULES, HDR)
    if rank == 0:
        return
    a_list = base + tl.load(desc_ptr + hdr + 2)
    a_row0 = tl.load(desc_ptr + hdr + 7)
    if GATHER:  # embed_tokens: x holds token ids, the shrink is a row lookup
        _gather_tile(x_ptr, arena_ptr, v_ptr, desc_ptr, a_list, a_row0, rank, row0, row_end, m * v_mod,
                     page_elems, stride_xm, stride_vm, LONG_M, BLOCK_R_LONG)
    elif row_end - row0 <= SHORT_M:  # decode-shaped: a few rows, fp32 multiply-sum
        _shrink_tile(x_ptr, arena_ptr, v_ptr, desc_ptr, a_list, a_row0, rank, row0, row_end, m * v_mod, K,
                     page_elems, stride_xm, stride_xk, stride_vm,
                     SHORT_M, BLOCK_R_SHORT, BLOCK_K, False, False, PRECISION)
    else:  # prefill-shaped: 16-row tiles through tl.dot
        _shrink_tile(x_ptr, arena_ptr, v_ptr, desc_ptr, a_list, a_row0, rank, row0, row_end, m * v_mod, K,
                     page_elems, stride_xm, stride_xk, stride_vm,
                     LONG_M, BLOCK_R_LONG, BLOCK_K, True, UPCAST, PRECISION)


@triton.jit
def _expand_tile(
    v_ptr, arena_ptr, y_ptr, desc_ptr, b_list, b_row0, g_list, g_row0, replace, rank, scale, row0, row_end,
    v_col, col, width, n0, page_elems, stride_vm, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``y[t, col + n] += scale * sum_j v[t, v_col + j] * B^T[j, n]``: the tile's rows, one column block;
    then ``y *= g[n]`` if ``g_list`` (DoRA); ``replace``: ``y`` starts from 0. Rows longer than a
    page are stored in pieces of ``page_elems`` columns (piece-major); this block lies in piece ``c``."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    cw = tl.minimum(width, page_elems)
    c = n0 // cw
    offs_p = offs_n - c * cw  # the columns within the piece
    rpp = page_elems // cw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        vt = tl.load(v_ptr + offs_m[:, None] * stride_vm + (v_col + offs_r)[None, :],
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        q = b_row0 + c * rank + offs_r
        pages = tl.load(desc_ptr + b_list + q // rpp, mask=r_mask, other=0)
        row_base = pages.to(tl.int64) * page_elems + (q % rpp) * cw
        bt = tl.load(arena_ptr + row_base[:, None] + offs_p[None, :],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if USE_DOT:
            if UPCAST:
                acc += tl.dot(vt, bt.to(tl.float32), input_precision=PRECISION)
            else:
                acc += tl.dot(vt.to(bt.dtype), bt, input_precision=PRECISION)
        else:
            acc += tl.sum(vt[:, :, None] * bt.to(tl.float32)[None, :, :], axis=1)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + (col + offs_n)[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(replace, 0.0, y)  # a full copy drops the base output
    dora = g_list != 0
    gq = g_row0 + c  # g is one row (in pieces: one stored row per piece)
    g_page = tl.load(desc_ptr + g_list + gq // rpp, mask=dora, other=0).to(tl.int64)
    # without DoRA, g_page is 0: a harmless read of page 0, replaced by 1
    g = tl.load(arena_ptr + g_page * page_elems + (gq % rpp) * cw + offs_p, mask=n_mask, other=1.0)
    g = tl.where(dora, g.to(tl.float32), 1.0)
    tl.store(y_ptrs, ((y + scale * acc) * g[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expand_kernel(
    v_ptr, arena_ptr, y_ptr, tiles_ptr, desc_ptr, scale_ptr,
    layer, page_elems, stride_vm, v_mod, stride_ym, stride_yn, W0, W1, W2,
    NUM_MODULES: tl.constexpr, HDR: tl.constexpr, FIRST: tl.constexpr, SHORT_M: tl.constexpr,
    LONG_M: tl.constexpr, BLOCK_R_SHORT: tl.constexpr, BLOCK_R_LONG: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(1)
    n0 = tl.program_id(2) * BLOCK_N
    block_width = tl.where(m == 0, W0, tl.where(m == 1, W1, W2))
    row0, row_end, base, hdr, rank = _tile_header(tiles_ptr, desc_ptr, layer, FIRST + m, NUM_MODULES, HDR)
    width = tl.minimum(block_width, tl.load(desc_ptr + hdr + 5, mask=rank != 0, other=0))  # out_features
    if (rank == 0) | (n0 >= width):
        return
    replace = tl.load(desc_ptr + hdr + 6) != 0
    b_list = base + tl.load(desc_ptr + hdr + 3)
    b_row0, g_row0 = tl.load(desc_ptr + hdr + 8), tl.load(desc_ptr + hdr + 9)
    g_start = tl.load(desc_ptr + hdr + 4)
    g_list = tl.where(g_start != 0, base + g_start, 0)
    scale = tl.load(scale_ptr + hdr + 1)
    col = tl.where(m == 0, 0, tl.where(m == 1, W0, W0 + W1))
    if row_end - row0 <= SHORT_M:
        _expand_tile(v_ptr, arena_ptr, y_ptr, desc_ptr, b_list, b_row0, g_list, g_row0, replace, rank, scale,
                     row0, row_end, m * v_mod, col, width, n0, page_elems, stride_vm, stride_ym, stride_yn,
                     SHORT_M, BLOCK_R_SHORT, BLOCK_N, False, False, PRECISION)
    else:
        _expand_tile(v_ptr, arena_ptr, y_ptr, desc_ptr, b_list, b_row0, g_list, g_row0, replace, rank, scale,
                     row0, row_end, m * v_mod, col, width, n0, page_elems, stride_vm, stride_ym, stride_yn,
                     LONG_M, BLOCK_R_LONG, BLOCK_N, True, UPCAST, PRECISION)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


class TritonLoraStep(LoraStep):
    def __init__(self, backend: TritonLoraBackend, tiles: Tiles, v: torch.Tensor, max_rank: int,
                 sample_tiles: Tiles | None, model_modules: frozenset[str]) -> None:
        self.backend = backend
        self.short_m, self.num_tiles = tiles.short_m, tiles.items.shape[0]
        self.shape = {False: (self.short_m, self.num_tiles)}  # per "are these the sample rows""
        if sample_tiles is not None:
            self.shape[True] = (sample_tiles.short_m, sample_tiles.items.shape[0])
        self.v = v  # [T, MAX_GROUP * max_rank] fp32 scratch
        self.max_rank = max_rank
        self.model_modules = model_modules  # the model-wide sites some adapter of the step has

    def bind(self, views: Mapping[str, torch.Tensor]) -> None:
        self.desc = views["lora_desc"]
        self.scales = self.desc.view(torch.float32)  # the same words, read as the scales they hold
        self.tiles = {False: views["lora_tiles"], True: views.get("lora_sample_tiles")}

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, y: torch.Tensor) -> None:
        first = group.modules[0]
        samples = group.kind == SAMPLES
        if (first in MODEL_MODULES and first not in self.model_modules) or samples not in self.shape:
            return
        page_elems = self.backend.arena.shape[1]
        if max(group.widths) > page_elems and page_elems % BLOCK_N:
            # vocab-long B^T rows are stored in page-long pieces: a column block must lie in one
            raise ValueError(f"lm_head LoRA on Triton needs page_elems to be a multiple of {BLOCK_N}")
        short_m, num_tiles = self.shape[samples]
        tiles = self.tiles[samples]
        arena, v, rank = self.backend.arena, self.v, self.max_rank
        n_mod = len(group.modules)
        upcast = _INTERPRET and y.dtype == torch.bfloat16
        opts = dict(NUM_MODULES=len(KERNEL_MODULES), HDR=HDR_FIELDS, FIRST=group.first, SHORT_M=short_m,
                    LONG_M=SGMV_BLOCK_M, UPCAST=upcast,
                    PRECISION="ieee" if y.dtype == torch.float32 or upcast else "tf32")
        _shrink_kernel[(num_tiles, n_mod)](
            x, arena, v, tiles, self.desc, layer, group.in_features, arena.shape[1], x.stride(0),
            x.stride(-1), v.stride(0), rank, BLOCK_R_SHORT=16, BLOCK_R_LONG=_block(rank, 16, 64),
            BLOCK_K=_block(group.in_features, 16, 64), GATHER=group.kind == GATHER, **opts)
        _expand_kernel[(num_tiles, n_mod, triton.cdiv(max(group.widths), BLOCK_N))](
            v, arena, y, tiles, self.desc, self.scales, layer, arena.shape[1], v.stride(0), rank,
            y.stride(0), y.stride(1), *(*group.widths, 0, 0)[:MAX_GROUP], BLOCK_R_SHORT=16,
            BLOCK_R_LONG=_block(rank, 16, 32), BLOCK_N=BLOCK_N, **opts)


class TritonLoraBackend(LoraBackend):
    """Fused Triton LoRA kernels; metadata in the step's one upload; adapter writes batched."""

    name = "triton"

    def __init__(self, arena: torch.Tensor, layout: PageLayout) -> None:
        super().__init__(arena, layout)
        self.writer = PageWriter(arena)
        self._blocks: dict[int, AdapterBlock] = {}
        self._v = torch.empty(0, dtype=torch.float32, device=arena.device)

    def write_adapter(self, table: AdapterPageTable, weights: AdapterWeights) -> None:
        self.writer.write(table, weights)

    def drop_adapter(self, uid: int) -> None:
        self._blocks.pop(uid, None)
        self.writer.forget(uid)

    def __contains__(self, uid: int) -> bool:
        return uid in self._blocks

    def _block(self, table: AdapterPageTable) -> AdapterBlock:
        hit = self._blocks.get(table.uid)
        if hit is None:
            hit = self._blocks[table.uid] = adapter_block(table, self.layout.num_layers)
        return hit

    def _scratch(self, rows: int, cols: int) -> torch.Tensor:
        """``v [rows, cols]`` from a grow-only fp32 buffer: no allocation in the steady state."""
        if self._v.numel() < rows * cols:
            self._v = torch.empty(1 << (rows * cols - 1).bit_length(), dtype=torch.float32,
                                  device=self.arena.device)
        return self._v[: rows * cols].view(rows, cols)

    def prepare_step(self, segments: LoraSegments, adapters: Sequence[AdapterPageTable],
                     pack: StepPack, samples: LoraSegments | None = None) -> LoraStep:
        self.writer.ready(a.uid for a in adapters)
        blocks = [self._block(a) for a in adapters]
        bases = np.cumsum([0] + [b.data.size for b in blocks[:-1]]).tolist()
        tiles = plan_tiles(segments.seg_starts, segments.seg_slots, bases)
        if tiles is None:
            return NO_LORA
        model_modules = frozenset().union(*(b.model_modules for b in blocks))
        pack.add("lora_desc", np.concatenate([b.data for b in blocks]))
        pack.add("lora_tiles", tiles.items)
        sample_tiles = None
        if samples is not None and LM_HEAD in model_modules:
            sample_tiles = plan_tiles(samples.seg_starts, samples.seg_slots, bases)
            if sample_tiles is not None:
                pack.add("lora_sample_tiles", sample_tiles.items)
        max_rank = max(b.max_rank for b in blocks) or 1
        v = self._scratch(segments.num_tokens, MAX_GROUP * max_rank)
        return TritonLoraStep(self, tiles, v, max_rank, sample_tiles, model_modules)
