"""The torch LoRA reference ops and LoraBatch against a dense computation from the original A/B."""

from __future__ import annotations

import pytest
import torch
from lora_cases import LAYOUT, RANKS, SEG_LENS, SEG_SLOTS, PageAlloc, add_matrix, build_args, dense_delta
from lora_cases import dense_shrink as dense_shrink_ref

from kernels.lora import (
    GatherCache,
    LoraArgs,
    LoraBatch,
    LoraSegments,
    lora_expand_ref,
    lora_shrink_ref,
    read_matrix_rows,
    write_matrix_rows,
)
from server.page_layout import AdapterPageTable

# fp32: the ops accumulate in fp32 over K <= 64 and r <= 128 terms of O(1) values, so errors are a
# few 1e-6; 1e-4 leaves room without hiding a wrong row or rank. bf16: v is rounded to bf16 (8-bit
# mantissa, relative 2^-9) before the expand and y is stored in bf16, so O(1) outputs carry ~1e-2
# absolute error; 3e-2 is about 4 bf16 ulps at magnitude 2, far below a missing or misplaced term.
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}
K, N = 48, 32
SHAPES = {
    "q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "gate_proj": (32, 48), "up_proj": (32, 48),
}  # fmt: skip


def test_write_matrix_rows_layout() -> None:
    arena = torch.zeros(8, LAYOUT.page_elems)
    rows = torch.arange(5 * 48, dtype=torch.float32).view(5, 48)  # rpp = 128 // 48 = 2
    write_matrix_rows(arena, [6, 1, 3], rows)
    for j in range(5):
        page, off = [6, 1, 3][j // 2], (j % 2) * 48
        torch.testing.assert_close(arena[page, off : off + 48], rows[j])
    torch.testing.assert_close(read_matrix_rows(arena, [6, 1, 3], 5, 48), rows)
    with pytest.raises(ValueError):
        write_matrix_rows(arena, [6, 1], rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_expand_mixed_ranks(dtype: torch.dtype) -> None:
    arena, args, dense = build_args(RANKS, SEG_LENS, SEG_SLOTS, K, N, dtype)
    x = torch.randn(args.segments.num_tokens, K).to(dtype)
    v = lora_shrink_ref(x, arena, args)
    assert v.shape == (x.shape[0], 128)
    torch.testing.assert_close(v.double(), dense_shrink_ref(x, args, dense), **TOL[dtype])
    y0 = torch.randn(x.shape[0], N).to(dtype)
    y = y0.clone()
    lora_expand_ref(v, arena, args, y)
    torch.testing.assert_close(y.double(), y0.double() + dense_delta(x, args, dense), **TOL[dtype])


def test_expand_into_noncontiguous_column_slice() -> None:
    arena, args, dense = build_args(RANKS, SEG_LENS, SEG_SLOTS, K, N, torch.float32, seed=3)
    x = torch.randn(args.segments.num_tokens, K)
    fused = torch.randn(x.shape[0], 80)
    before = fused.clone()
    y = fused[:, 40:72]
    assert not y.is_contiguous()
    lora_expand_ref(lora_shrink_ref(x, arena, args), arena, args, y)
    expected = before[:, 40:72].double() + dense_delta(x, args, dense)
    torch.testing.assert_close(fused[:, 40:72].double(), expected, **TOL[torch.float32])
    torch.testing.assert_close(fused[:, :40], before[:, :40])
    torch.testing.assert_close(fused[:, 72:], before[:, 72:])


def test_no_adapter_tokens_and_empty_call() -> None:
    arena, args, _ = build_args([8], [0, 4, 0], [0, -1, 0], K, N, torch.float32)
    x = torch.randn(4, K)
    assert not lora_shrink_ref(x, arena, args).any()
    y = torch.randn(4, N)
    before = y.clone()
    lora_expand_ref(torch.zeros(4, 8), arena, args, y)
    torch.testing.assert_close(y, before)


def test_segments_validation() -> None:
    with pytest.raises(ValueError):
        LoraSegments((0, 3, 2), (0, 0))
    with pytest.raises(ValueError):
        LoraSegments((1, 3), (0,))
    arena, args, _ = build_args([8], [2], [0], K, N, torch.float32)
    with pytest.raises(ValueError):
        LoraArgs(LoraSegments((0, 2), (1,)), args.mats)


def _model_adapters(arena: torch.Tensor, shapes: dict[str, tuple[int, int]]):
    """Three adapters: full, attention-only on layer 0 only, and MLP-only with per-module ranks."""
    gen = torch.Generator().manual_seed(7)
    alloc = PageAlloc(arena.shape[0], seed=7)
    plans = [
        {(layer, m): 16 for layer in (0, 1) for m in shapes},
        {(0, m): 4 for m in ("q_proj", "k_proj", "v_proj")},
        {(layer, m): r for layer in (0, 1) for m, r in (("gate_proj", 1), ("up_proj", 32), ("q_proj", 8))},
    ]
    tables, dense = [], []
    for uid, plan in enumerate(plans, start=100):
        mods, dens = {}, {}
        for (layer, m), rank in plan.items():
            mods[(layer, m)], dens[(layer, m)] = add_matrix(arena, alloc, rank, *shapes[m], gen)
        tables.append(AdapterPageTable(uid, mods))
        dense.append(dens)
    return tables, dense


@pytest.mark.parametrize(
    ("dtype", "cache"),
    [(torch.float32, GatherCache()), (torch.float32, None), (torch.bfloat16, GatherCache(torch.float32))],
)
def test_lora_batch_fused_outputs_and_missing_modules(dtype: torch.dtype, cache: GatherCache | None) -> None:
    shapes = SHAPES
    arena = torch.randn(512, LAYOUT.page_elems).to(dtype)
    adapters, dense = _model_adapters(arena, shapes)
    seg_starts, seg_slots = [0, 2, 3, 3, 7, 8, 9], [1, -1, 0, 2, 0, 1]  # slot 0 twice, not sorted
    token_slot = [1, 1, -1, 2, 2, 2, 2, 0, 1]
    x = torch.randn(9, 32).to(dtype)
    for layer in (0, 1):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            batch = LoraBatch(arena, LAYOUT, seg_starts, seg_slots, adapters, "torch", cache)
            fused = torch.randn(9, sum(shapes[m][1] for m in group)).to(dtype)
            expected = fused.double().clone()
            col = 0
            for m in group:
                width = shapes[m][1]
                batch.apply(layer, m, x, fused[:, col : col + width])
                for t, slot in enumerate(token_slot):
                    d = dense[slot].get((layer, m)) if slot >= 0 else None
                    if d is not None:
                        delta = (x[t].double() @ d.a.double().T) @ d.b.double().T
                        expected[t, col : col + width] += d.scale * delta
                col += width
            torch.testing.assert_close(fused.double(), expected, **TOL[dtype])
    if cache is not None:
        assert 100 in cache and len(cache) == 3
        cache.drop(100)
        assert 100 not in cache and len(cache) == 2


def test_lora_batch_noop_when_no_adapter_tokens() -> None:
    arena = torch.randn(64, LAYOUT.page_elems)
    adapters, _ = _model_adapters(torch.zeros(512, LAYOUT.page_elems), SHAPES)
    y = torch.randn(5, 32)
    before = y.clone()
    LoraBatch.empty().apply(0, "q_proj", torch.randn(5, 32), y)
    batch = LoraBatch(arena, LAYOUT, [0, 3, 3, 5], [-1, 0, -1], adapters)
    assert not batch.active
    batch.apply(0, "q_proj", torch.randn(5, 32), y)
    torch.testing.assert_close(y, before)
    with pytest.raises(ValueError):
        LoraBatch(arena, LAYOUT, [0, 1], [0], adapters, backend="cuda-magic")
