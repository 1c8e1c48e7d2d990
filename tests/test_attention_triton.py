"""Triton paged KV store and paged attention against the torch reference.

Without a GPU these run under TRITON_INTERPRET=1 (set in conftest.py), so shapes are small: D of 16
and 32, 2-9 heads, blocks of 4-8 tokens, contexts up to 64 tokens.
"""

from __future__ import annotations

import pytest
import torch
from test_attention_ref import DECODE_ONLY, MIXED, TOL, build_case, dense_attention, store_step

from kernels.attention import paged_attention_ref, store_kv_ref
from kernels.backend import select_backend

pytestmark = pytest.mark.slow

triton_attention = pytest.importorskip("kernels.triton_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("seqs", "h", "kvh", "d", "block_size", "dtype"),
    [
        (MIXED, 9, 3, 16, 4, torch.float32),
        (MIXED, 8, 2, 32, 8, torch.bfloat16),
        (MIXED, 4, 4, 16, 8, torch.float32),
        (DECODE_ONLY, 6, 2, 32, 4, torch.bfloat16),
        ([(70, 40), (12, 1)], 8, 2, 16, 8, torch.float32),
    ],
    ids=["mixed-gqa3-fp32", "mixed-gqa4-bf16", "mixed-mha-fp32", "decode-gqa3-bf16", "chunk-3-tiles"],
)
def test_triton_matches_reference(seqs: list[tuple[int, int]], h: int, kvh: int, d: int,
                                  block_size: int, dtype: torch.dtype) -> None:
    case = build_case(seqs, h, kvh, d, block_size, dtype, num_layers=2, seed=7, device=DEVICE)
    ref_pages = case.kv_pages.clone()
    for layer in range(2):
        store_step(case, layer, triton_attention.store_kv_triton)
        store_kv_ref(ref_pages, case.step_k[layer], case.step_v[layer], case.meta.slot_mapping[layer])
        torch.testing.assert_close(case.kv_pages, ref_pages, rtol=0, atol=0)
        scale = d**-0.5
        block_n = 16 if len(seqs) > 2 else 64  # 16: several small tiles per sequence; 64: 8 pages each
        out = triton_attention.paged_attention_triton(case.q, case.kv_pages, case.meta, layer, scale,
                                                      block_n=block_n)
        ref = paged_attention_ref(case.q, case.kv_pages, case.meta, layer, scale)
        assert out.dtype == dtype and out.shape == case.q.shape
        torch.testing.assert_close(out, ref, **TOL[dtype])
        torch.testing.assert_close(out.float().cpu(), dense_attention(case, layer, scale), **TOL[dtype])


def test_store_kv_triton_skips_minus_one_and_reads_strided_k() -> None:
    kv_pages = torch.zeros(3, 2, 4, 2, 16, device=DEVICE)
    qkv = torch.randn(4, 3, 2, 16, device=DEVICE)
    k, v = qkv[:, 1], qkv[:, 2]  # strided views, as sliced from a fused qkv projection
    slots = torch.tensor([5, -1, 11, 0], device=DEVICE)
    triton_attention.store_kv_triton(kv_pages, k, v, slots)
    expected = torch.zeros_like(kv_pages)
    store_kv_ref(expected, k, v, slots)
    torch.testing.assert_close(kv_pages, expected, rtol=0, atol=0)


def test_triton_backend_can_be_forced() -> None:
    backend = select_backend(torch.device(DEVICE), "triton")
    assert backend.name == "triton"
    assert backend.paged_attention is triton_attention.paged_attention_triton
