"""Paged KV store and paged attention (torch reference) against dense causal attention.

The dense oracle sees each sequence's K/V as one contiguous tensor and computes in fp32; the paged
side reads them through shuffled, non-contiguous pages whose unused slots hold finite garbage, so a
wrong page, offset or mask shows up as a large error. ``build_case`` is shared with the Triton tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from kernels.attention import AttnMeta, paged_attention_ref, store_kv_ref
from kernels.backend import select_backend

StoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

# A 2nd prefill chunk (13 new tokens on 24 cached), decode tokens with contexts of 1, 20 and 64, a
# first prefill chunk, and a 1-token chunk; decode rows are interleaved with prefill rows.
MIXED = [(37, 13), (1, 1), (20, 1), (9, 9), (64, 1), (5, 1), (30, 30)]
DECODE_ONLY = [(c, 1) for c in (1, 3, 17, 33, 8, 50, 2, 16)]

# fp32: same math, different summation order (~1e-6). bf16: both sides read the same bf16 K/V, but
# the output is rounded to bf16 (2^-8 relative) and SDPA rounds probabilities to bf16 before P @ V,
# so results differ by up to ~3 bf16 ulps of O(1) values.
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@dataclass
class Case:
    q: torch.Tensor  # [T, H, D]
    kv_pages: torch.Tensor  # [num_pages, 2, block_size, KVH, D]
    meta: AttnMeta
    step_k: list[torch.Tensor]  # per layer [T, KVH, D]: this step's keys, not yet stored
    step_v: list[torch.Tensor]
    dense_k: list[list[torch.Tensor]]  # [layer][seq] -> [ctx_len, KVH, D]
    dense_v: list[list[torch.Tensor]]
    q_lens: list[int]


def build_case(seqs: list[tuple[int, int]], h: int, kvh: int, d: int, block_size: int,
               dtype: torch.dtype, num_layers: int = 2, seed: int = 0, device: str = "cpu") -> Case:
    """Random batch of sequences given as (ctx_len, q_len); history tokens already in the pages."""
    gen = torch.Generator().manual_seed(seed)
    ctx = [c for c, _ in seqs]
    q_lens = [n for _, n in seqs]
    blocks = [-(-c // block_size) for c in ctx]
    num_pages = sum(blocks) * num_layers + 5
    kv_pages = 10 * torch.randn(num_pages, 2, block_size, kvh, d, generator=gen)
    perm = torch.randperm(num_pages, generator=gen).tolist()
    block_tables = torch.zeros(num_layers, len(seqs), max(blocks), dtype=torch.int32)
    slots = torch.full((num_layers, sum(q_lens)), -1, dtype=torch.int64)
    dense_k, dense_v, step_k, step_v = [], [], [], []
    for layer in range(num_layers):
        ks = [torch.randn(c, kvh, d, generator=gen).to(dtype) for c in ctx]
        vs = [torch.randn(c, kvh, d, generator=gen).to(dtype) for c in ctx]
        row = 0
        for s, (c, n) in enumerate(seqs):
            pages = [perm.pop() for _ in range(blocks[s])]
            block_tables[layer, s, : blocks[s]] = torch.tensor(pages)
            for p in range(c):
                page, off = pages[p // block_size], p % block_size
                if p < c - n:
                    kv_pages[page, 0, off], kv_pages[page, 1, off] = ks[s][p], vs[s][p]
                else:
                    slots[layer, row] = page * block_size + off
                    row += 1
        dense_k.append(ks)
        dense_v.append(vs)
        step_k.append(torch.cat([k[c - n :] for k, (c, n) in zip(ks, seqs, strict=True)]).to(device))
        step_v.append(torch.cat([v[c - n :] for v, (c, n) in zip(vs, seqs, strict=True)]).to(device))
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttnMeta(block_tables.to(device), slots.to(device), cu.to(device),
                    torch.tensor(ctx, dtype=torch.int32, device=device), max(q_lens), max(ctx),
                    tuple(cu.tolist()), tuple(ctx))
    q = torch.randn(sum(q_lens), h, d, generator=gen).to(dtype).to(device)
    return Case(q, kv_pages.to(dtype).to(device), meta, step_k, step_v, dense_k, dense_v, q_lens)


def store_step(case: Case, layer: int, store: StoreFn) -> None:
    store(case.kv_pages, case.step_k[layer], case.step_v[layer], case.meta.slot_mapping[layer])


def dense_attention(case: Case, layer: int, scale: float) -> torch.Tensor:
    """Naive causal GQA attention in fp32 from contiguous K/V: [T, H, D] fp32."""
    outs = []
    row = 0
    h = case.q.shape[1]
    for k, v, n in zip(case.dense_k[layer], case.dense_v[layer], case.q_lens, strict=True):
        c = k.shape[0]
        g = h // k.shape[1]
        q = case.q[row : row + n].float().cpu()
        kr, vr = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
        scores = torch.einsum("qhd,khd->hqk", q, kr) * scale
        pos = torch.arange(c - n, c)
        scores.masked_fill_(torch.arange(c)[None, :] > pos[:, None], float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vr))
        row += n
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("h", "kvh"), [(4, 4), (9, 3), (8, 2)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_batch_matches_dense(dtype: torch.dtype, h: int, kvh: int, block_size: int) -> None:
    case = build_case(MIXED, h, kvh, 16, block_size, dtype, seed=h + block_size)
    for layer in range(2):
        store_step(case, layer, store_kv_ref)
        out = paged_attention_ref(case.q, case.kv_pages, case.meta, layer, scale=0.25)
        assert out.dtype == dtype and out.shape == case.q.shape
        torch.testing.assert_close(out.float(), dense_attention(case, layer, 0.25), **TOL[dtype])


@pytest.mark.parametrize("seqs", [DECODE_ONLY, [(40, 40)], [(100, 7)], [(1, 1)]], ids=str)
def test_single_kind_batches(seqs: list[tuple[int, int]]) -> None:
    case = build_case(seqs, 6, 2, 32, 8, torch.float32, num_layers=1, seed=3)
    store_step(case, 0, store_kv_ref)
    out = paged_attention_ref(case.q, case.kv_pages, case.meta, 0, scale=32**-0.5)
    torch.testing.assert_close(out, dense_attention(case, 0, 32**-0.5), **TOL[torch.float32])


def test_meta_plan_is_cached_across_layers() -> None:
    case = build_case(MIXED, 4, 2, 16, 8, torch.float32)
    plan = case.meta.cpu_plan(8, torch.float32)
    assert case.meta.cpu_plan(8, torch.float32) is plan
    assert plan.decode is not None and plan.decode.rows.tolist() == [13, 14, 24, 25]
    assert [p.seq for p in plan.prefills] == [0, 3, 6]


def test_store_kv_writes_slots_and_skips_minus_one() -> None:
    kv_pages = torch.zeros(4, 2, 4, 2, 8)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([6, -1, 0, 15, -1])
    store_kv_ref(kv_pages, k, v, slots)
    expected = torch.zeros(4, 2, 4, 2, 8)
    for t, (page, off) in {0: (1, 2), 2: (0, 0), 3: (3, 3)}.items():
        expected[page, 0, off], expected[page, 1, off] = k[t], v[t]
    torch.testing.assert_close(kv_pages, expected, rtol=0, atol=0)


def test_store_kv_casts_into_arena_dtype_through_a_view() -> None:
    arena = torch.zeros(3, 2 * 4 * 2 * 8, dtype=torch.bfloat16)
    kv_pages = arena.view(3, 2, 4, 2, 8)
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    store_kv_ref(kv_pages, k.bfloat16(), v.bfloat16(), torch.tensor([11, 1]))
    torch.testing.assert_close(arena.view(3, 2, 4, 2, 8)[2, 1, 3], v[0].bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(arena.view(3, 2, 4, 2, 8)[0, 0, 1], k[1].bfloat16(), rtol=0, atol=0)


def test_torch_backend_is_the_reference() -> None:
    backend = select_backend(torch.device("cpu"), "torch")
    assert backend.name == "torch"
    assert backend.store_kv is store_kv_ref and backend.paged_attention is paged_attention_ref
    with pytest.raises(ValueError, match="unknown kernel backend"):
        select_backend(torch.device("cpu"), "cuda-graphs")
