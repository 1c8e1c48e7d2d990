"""The base model's fused C ops (kernels/model_native.c) against their torch references.

fp32: only summation order differs. bf16: the C ops round where the references round, so they
agree to a bf16 ulp or two (attention: the reference's SDPA rounds probabilities to bf16 first).
"""

from __future__ import annotations

import pytest
import torch
from test_attention_ref import MIXED, TOL, build_case, dense_attention, store_step

from kernels import model_native
from kernels.attention import store_kv_ref
from kernels.backend import select_backend
from kernels.native_lib import available
from server import layers
from server.layers import RopeTables

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler for the native ops")
DTYPES = [torch.float32, torch.bfloat16]
CLOSE = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_matches_reference(dtype: torch.dtype, with_delta: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(7, 37, generator=gen).to(dtype)
    delta = torch.randn(7, 37, generator=gen).to(dtype) if with_delta else None
    w = torch.rand(37, generator=gen).to(dtype)
    h_ref = h.clone()
    expected = layers.add_rms_norm(h_ref, delta, w, 1e-5)
    got = model_native.add_rms_norm(h, delta, w, 1e-5)
    assert torch.equal(h, h_ref)  # the residual add is exact in either dtype
    torch.testing.assert_close(got, expected, **CLOSE[dtype])


def test_add_rms_norm_reads_strided_rows() -> None:
    wide = torch.randn(5, 50)
    h = wide[:, :20]
    expected = layers.rms_norm(h.contiguous(), torch.ones(20), 1e-6)
    got = model_native.rms_norm(h, torch.ones(20), 1e-6)
    torch.testing.assert_close(got, expected, **CLOSE[torch.float32])
    with pytest.raises(ValueError, match="unit column stride"):
        model_native.rms_norm(wide.t(), torch.ones(5), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_swiglu(dtype: torch.dtype) -> None:
    gate_up = (3 * torch.randn(9, 2 * 21)).to(dtype)
    torch.testing.assert_close(model_native.silu_mul(gate_up), layers.swiglu(gate_up), **CLOSE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store_kv_matches_reference(dtype: torch.dtype) -> None:
    h, kvh, d, bs, t = 6, 2, 16, 4, 5
    cos = torch.randn(40, d)
    sin = torch.randn(40, d)
    positions = torch.tensor([0, 3, 39, 7, 7], dtype=torch.int32)
    slots = torch.tensor([6, -1, 0, 15, 9], dtype=torch.int32)
    qkv = torch.randn(t, (h + 2 * kvh) * d).to(dtype)
    pages = [torch.zeros(4, 2, bs, kvh, d, dtype=dtype) for _ in range(2)]
    qkv_ref = qkv.clone()
    rope = RopeTables(positions, cos, sin, dtype)
    q_ref = layers.rope_store_kv_with(store_kv_ref)(qkv_ref, rope, pages[0], slots.long(), h, kvh)
    q = model_native.rope_store_kv(qkv, rope, pages[1], slots, h, kvh)
    torch.testing.assert_close(q, q_ref, **CLOSE[dtype])
    torch.testing.assert_close(pages[1], pages[0], **CLOSE[dtype])
    assert torch.equal(qkv[:, (h + kvh) * d :], qkv_ref[:, (h + kvh) * d :])  # v is not rotated


# MIXED plus prefill chunks over short contexts (the C kernel: a chunk on a cached prefix, a first
# chunk) and over long ones (SDPA: with a mask on a cached prefix, and a first chunk).
SEQS = [*MIXED, (50, 20), (24, 24), (700, 40), (1000, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("h", "kvh"), [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention_native_matches_dense(dtype: torch.dtype, h: int, kvh: int, block_size: int) -> None:
    case = build_case(SEQS, h, kvh, 16, block_size, dtype, seed=h + block_size)
    for layer in range(2):
        store_step(case, layer, store_kv_ref)
        out = model_native.paged_attention_native(case.q, case.kv_pages, case.meta, layer, scale=0.25)
        assert out.dtype == dtype and out.shape == case.q.shape
        torch.testing.assert_close(out.float(), dense_attention(case, layer, 0.25), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [16, 40, 64])
def test_paged_attention_native_many_sequences_read_whole_rows(dtype: torch.dtype, d: int) -> None:
    """With at least 4 short runs per thread, a work item takes all KV heads of its sequence (whole
    K/V rows; fewer sequences take one KV head each, as above). Head dims below, between and at
    multiples of the kernel's vector width (the V sum's vector and scalar parts)."""
    n = 4 * torch.get_num_threads() + 3
    seqs = [(1 + (7 * i) % 45, 1) for i in range(n)] + [(9, 2), (33, 3)]
    case = build_case(seqs, 9, 3, d, 16, dtype, seed=d)
    for layer in range(2):
        store_step(case, layer, store_kv_ref)
        out = model_native.paged_attention_native(case.q, case.kv_pages, case.meta, layer, scale=0.25)
        torch.testing.assert_close(out.float(), dense_attention(case, layer, 0.25), **TOL[dtype])


@pytest.mark.parametrize("many", [False, True])
def test_paged_attention_native_takes_any_gqa_group(many: bool) -> None:
    """72 query heads on one KV head: the per-head state lives in the kernel's scratch, not in a
    fixed array (it was capped at 64 heads per KV head)."""
    seqs = [(1 + 5 * i, 1) for i in range(4 * torch.get_num_threads() if many else 1)] + [(20, 3)]
    case = build_case(seqs, 72, 1, 16, 16, torch.float32, seed=3)
    store_step(case, 0, store_kv_ref)
    out = model_native.paged_attention_native(case.q, case.kv_pages, case.meta, 0, scale=0.25)
    torch.testing.assert_close(out.float(), dense_attention(case, 0, 0.25), **TOL[torch.float32])


def test_native_plan_splits_short_and_long_runs() -> None:
    case = build_case(SEQS, 4, 2, 16, 8, torch.float32)
    model_native.paged_attention_native(case.q, case.kv_pages, case.meta, 0, 0.25)

    def rebuilt() -> None:
        raise AssertionError("the first layer's plan is reused")

    plan = case.meta.cached(("native", 8, torch.float32), rebuilt)
    assert plan.short.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert [p.seq for p in plan.prefills] == [9, 10]


def test_cpu_default_backend_is_native() -> None:
    backend = select_backend(torch.device("cpu"))
    assert backend.name == "native" and backend.paged_attention is model_native.paged_attention_native
    assert select_backend(torch.device("cpu"), "native", torch.bfloat16).name == "native"
    with pytest.raises(ValueError, match="native ops need"):
        select_backend(torch.device("cpu"), "native", torch.float16)
