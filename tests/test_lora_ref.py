"""The torch LoRA reference ops and the group reference against a dense computation from the original A/B."""

from __future__ import annotations

import pytest
import torch
from lora_cases import (
    GROUPS,
    LAYOUT,
    RANKS,
    SEG_LENS,
    SEG_SLOTS,
    build_args,
    dense_delta,
    dense_group,
    group_cases,
    group_input,
    model_adapters,
)
from lora_cases import dense_shrink as dense_shrink_ref

from kernels.lora import LoraArgs, LoraSegments, lora_expand_ref, lora_group_ref, lora_shrink_ref
from kernels.lora_pages import read_matrix_rows, write_matrix_rows

# fp32: the ops accumulate in fp32 over K <= 64 and r <= 128 terms of O(1) values, so errors are a
# few 1e-6; 1e-4 leaves room without hiding a wrong row or rank. bf16: v is rounded to bf16 (8-bit
# mantissa, relative 2^-9) before the expand and y is stored in bf16, so O(1) outputs carry ~1e-2
# absolute error; 3e-2 is about 4 bf16 ulps at magnitude 2, far below a missing or misplaced term.
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}
K, N = 48, 32


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_ref_fused_outputs_and_missing_modules(dtype: torch.dtype) -> None:
    """``lora_group_ref`` (what every backend's ``apply`` must compute) against the dense oracle:
    each module into its own column block; adapters lacking a module or a layer add nothing there;
    DoRA modules scale the sum; embed_tokens gathers by token id; lm_head's rows span pieces."""
    arena = torch.randn(1024, LAYOUT.page_elems).to(dtype)
    adapters, dense = model_adapters(arena)
    seg_starts, seg_slots = [0, 2, 3, 3, 7, 8, 9], [1, -1, 0, 2, 0, 1]  # slot 0 twice, not sorted
    segments = LoraSegments(tuple(seg_starts), tuple(seg_slots))
    gen = torch.Generator().manual_seed(0)
    for layer, group in group_cases():
        x = group_input(group, 9, dtype, gen)
        fused = torch.randn(9, group.out_features + 8).to(dtype)
        y = fused[:, 4 : 4 + group.out_features]  # a strided view, as a fused projection's output
        expected = dense_group(x, y, seg_starts, seg_slots, dense, layer, group)
        lora_group_ref(arena, segments, adapters, layer, group, x, y)
        torch.testing.assert_close(y.double(), expected, **TOL[dtype])
        assert y.data_ptr() == fused[:, 4:].data_ptr()


def test_group_ref_noop_without_adapter_tokens() -> None:
    arena = torch.randn(1024, LAYOUT.page_elems)
    adapters, _ = model_adapters(arena)
    y = torch.randn(5, 64)
    before = y.clone()
    lora_group_ref(arena, LoraSegments((0, 3, 3, 5), (-1, 0, -1)), adapters, 0, GROUPS[0],
                   torch.randn(5, 32), y)
    torch.testing.assert_close(y, before)
