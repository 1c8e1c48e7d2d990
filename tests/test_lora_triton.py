"""Triton LoRA shrink/expand (reading pages in place) against the torch reference.

Without a GPU these run under TRITON_INTERPRET=1 (set in conftest.py), so shapes are small: K, N in
32..48 (48 exercises the masks of 64-wide tiles), one 150-token segment (10 row tiles) and a handful
of decode tokens.
"""

from __future__ import annotations

import pytest
import torch
from lora_cases import LAYOUT, RANKS, SEG_LENS, SEG_SLOTS, build_args, dense_delta

from kernels.lora import LoraBatch, lora_expand_ref, lora_shrink_ref
from server.page_layout import AdapterPageTable

pytestmark = pytest.mark.slow

triton_lora = pytest.importorskip("kernels.triton_lora")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Both sides accumulate in fp32 but sum in different orders: fp32 agrees to ~1e-6 (1e-4 allowed).
# In bf16 the kernel keeps the expand sum in fp32 and rounds y once, while the reference rounds the
# matmul result to bf16 and then adds it to y, so they differ by up to ~2 bf16 ulps of O(1) values.
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}


@pytest.mark.parametrize(("k", "n", "dtype"), [(32, 48, torch.float32), (48, 32, torch.bfloat16)])
def test_triton_matches_reference(k: int, n: int, dtype: torch.dtype) -> None:
    arena, args, dense = build_args(RANKS, SEG_LENS, SEG_SLOTS, k, n, dtype, seed=1)
    arena = arena.to(DEVICE)
    x = torch.randn(args.segments.num_tokens, k).to(dtype).to(DEVICE)
    v = triton_lora.lora_shrink_triton(x, arena, args)
    v_ref = lora_shrink_ref(x, arena, args)
    torch.testing.assert_close(v, v_ref, **TOL[dtype])
    fused = torch.randn(x.shape[0], n + 16).to(dtype).to(DEVICE)
    before = fused.clone()
    y = fused[:, 8 : 8 + n]  # a strided column slice of a fused output
    y_ref = y.clone()
    triton_lora.lora_expand_triton(v_ref, arena, args, y)
    lora_expand_ref(v_ref, arena, args, y_ref)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    expected = before[:, 8 : 8 + n].double().cpu() + dense_delta(x.cpu(), args, dense)
    torch.testing.assert_close(y.double().cpu(), expected, **TOL[dtype])
    torch.testing.assert_close(fused[:, :8], before[:, :8])
    torch.testing.assert_close(fused[:, 8 + n :], before[:, 8 + n :])


def test_triton_no_adapter_tokens() -> None:
    arena, args, _ = build_args([8, None], [0, 3, 2], [0, -1, 1], 32, 32, torch.float32)
    x = torch.randn(5, 32, device=DEVICE)
    assert not triton_lora.lora_shrink_triton(x, arena.to(DEVICE), args).any()
    y = torch.randn(5, 32, device=DEVICE)
    before = y.clone()
    triton_lora.lora_expand_triton(torch.ones(5, 8, device=DEVICE), arena.to(DEVICE), args, y)
    torch.testing.assert_close(y, before)


def test_lora_batch_triton_backend() -> None:
    arena, args, _ = build_args([16, 4], [2, 1, 3], [1, -1, 0], 32, 32, torch.float32, seed=2)
    arena = arena.to(DEVICE)
    adapters = [AdapterPageTable(10 + i, {(0, "q_proj"): m}) for i, m in enumerate(args.mats)]
    x = torch.randn(6, 32, device=DEVICE)
    y, y_ref = torch.zeros(6, 32, device=DEVICE), torch.zeros(6, 32, device=DEVICE)
    starts, slots = list(args.segments.seg_starts), list(args.segments.seg_slots)
    LoraBatch(arena, LAYOUT, starts, slots, adapters, "triton").apply(0, "q_proj", x, y)
    LoraBatch(arena, LAYOUT, starts, slots, adapters, "torch").apply(0, "q_proj", x, y_ref)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    assert y[2].abs().sum() == 0 and y.abs().sum() > 0
