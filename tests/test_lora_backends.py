"""Every LoRA backend (torch, native C, Triton) against the dense float64 oracle, through the interface
the model uses: ``prepare_step`` -> upload -> ``bind`` -> ``apply(layer, group, x, y)``.

The Triton backend runs under TRITON_INTERPRET=1 without a GPU (conftest.py), hence ``slow``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from lora_cases import (
    GROUPS,
    LAYOUT,
    SHAPES,
    VOCAB,
    Dense,
    PageAlloc,
    dense_group,
    group_cases,
    group_input,
    model_adapters,
)

from adapter_store.peft_format import LoraWeights
from kernels.backend import select_lora_backend
from kernels.lora import LoraSegments
from kernels.lora_pages import read_matrix_rows
from kernels.native_lib import available as native_available
from kernels.step_buffer import StepBuffer, StepPack
from server.adapter_residency import AdapterResidency, AdapterSpec, ModuleSpec
from server.model_config import GATHER, SAMPLES, LoraGroup
from server.page_layout import AdapterPageTable, LoraMatrixPages
from server.pool import PagePool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
Q_ONLY = LoraGroup("q", ("q_proj",), 32, (32,))
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("native", id="native",
                 marks=pytest.mark.skipif(DEVICE != "cpu" or not native_available(), reason="no C kernel")),
    pytest.param("triton", id="triton", marks=pytest.mark.slow),
]
# fp32: only summation order differs (1e-4). bf16: the backends round v and/or y at different
# points (the Triton decode kernels keep v in fp32); a few bf16 ulps of O(1) values.
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 4e-2, "rtol": 4e-2}}
# (seg_starts, seg_slots): decode singletons (Triton: 1-row tiles), short runs (4-row tiles), and a
# prefill step mixing 16-row tiles with decode tiles; no-adapter and empty segments, repeated slots.
SEGMENTS = {
    "decode": ([0, 1, 2, 3, 4, 5, 6, 7], [0, 2, -1, 1, 2, 0, 1]),
    "short": ([0, 3, 4, 4, 6, 9], [1, 2, 0, -1, 0]),
    "mixed": ([0, 2, 3, 23, 24, 41, 42], [1, -1, 0, 2, 1, 0]),
}


def make_backend(name: str, arena: torch.Tensor):
    return select_lora_backend(arena, LAYOUT, "torch", name)


def run_step(backend, seg_starts, seg_slots, adapters):
    """A step whose sample rows (the lm_head group's) are all its rows: same segments."""
    pack = StepPack()
    segments = LoraSegments(tuple(seg_starts), tuple(seg_slots))
    step = backend.prepare_step(segments, adapters, pack, segments)
    step.bind(StepBuffer(backend.arena.device).upload(pack))
    return step


@pytest.mark.parametrize("segments", sorted(SEGMENTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_matches_dense(name: str, dtype: torch.dtype, segments: str) -> None:
    seg_starts, seg_slots = SEGMENTS[segments]
    gen = torch.Generator().manual_seed(5)
    arena = torch.randn(1024, LAYOUT.page_elems, generator=gen).to(dtype)  # garbage outside the rows
    adapters, dense = model_adapters(arena)
    arena = arena.to(DEVICE)
    backend = make_backend(name, arena)
    step = run_step(backend, seg_starts, seg_slots, adapters)
    t = seg_starts[-1]
    for layer, group in group_cases():  # DoRA modules, an embed_tokens gather, lm_head rows in pieces
        x = group_input(group, t, dtype, gen)
        fused = torch.randn(t, group.out_features + 8, generator=gen).to(dtype)
        before = fused.clone()
        y = fused[:, : group.out_features]  # rows out_features + 8 apart, as in a fused output
        expected = dense_group(x, y, seg_starts, seg_slots, dense, layer, group)
        y_dev = y.to(DEVICE) if DEVICE != "cpu" else y
        step.apply(layer, group, x.to(DEVICE), y_dev)
        torch.testing.assert_close(y_dev.double().cpu(), expected, **TOL[dtype])
        assert torch.equal(fused[:, group.out_features :], before[:, group.out_features :])
        if layer == 0:
            assert not torch.equal(y.cpu(), before[:, : group.out_features]), group.name  # adds something


def _weights(table: AdapterPageTable, dtype: torch.dtype, seed: int) -> dict[tuple[int, str], LoraWeights]:
    gen = torch.Generator().manual_seed(seed)
    return {key: LoraWeights(torch.randn(m.rank, m.in_features, generator=gen).to(dtype),
                             torch.randn(m.out_features, m.rank, generator=gen).to(dtype), m.rank, m.scale)
            for key, m in table.modules.items()}


def _table(uid: int, alloc: PageAlloc) -> AdapterPageTable:
    mods = {}
    for (layer, module, rank, k, n) in ((0, "q_proj", 5, 32, 32), (1, "gate_proj", 9, 32, 48),
                                         (0, "down_proj", 3, 48, 32)):
        mods[(layer, module)] = LoraMatrixPages(rank, 0.5, k, n, alloc.take(LAYOUT.pages_for_rows(rank, k)),
                                                alloc.take(LAYOUT.pages_for_rows(rank, n)))
    return AdapterPageTable(uid, mods)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", BACKENDS)
def test_write_adapter_and_reuse_of_pages_after_drop(name: str, dtype: torch.dtype) -> None:
    """Rows land in their pages (A as is, B transposed; weights cast to the arena's dtype) and nothing
    else changes (page tails stay finite: the pages hold KV blocks again later, and the reference
    attention reads whole blocks); after ``drop_adapter`` the same pages hold a new adapter and
    steps see only it."""
    arena = torch.full((64, LAYOUT.page_elems), 7.0, dtype=dtype, device=DEVICE)
    backend = make_backend(name, arena)
    old = _table(1, PageAlloc(64, seed=1))
    for uid, table in ((1, old), (2, AdapterPageTable(2, old.modules))):  # 2 reuses 1's pages
        weights = _weights(table, torch.float32, seed=uid)
        backend.write_adapter(table, weights)
        for key, m in table.modules.items():
            w = weights[key]
            assert torch.equal(read_matrix_rows(arena, m.a_pages, m.rank, m.in_features).cpu(), w.a.to(dtype))
            assert torch.equal(read_matrix_rows(arena, m.b_pages, m.rank, m.out_features).cpu(),
                               w.b.t().to(dtype))
        for m in table.modules.values():  # page tails past the rows: zeroed or untouched, never garbage
            for pages, row_len in ((m.a_pages, m.in_features), (m.b_pages, m.out_features)):
                rpp = LAYOUT.page_elems // row_len
                tail = arena[pages[-1], (m.rank - (len(pages) - 1) * rpp) * row_len :].cpu()
                assert bool(((tail == 0) | (tail == 7)).all())
        used = {p for m in table.modules.values() for p in (*m.a_pages, *m.b_pages)}
        untouched = [p for p in range(64) if p not in used]
        assert bool((arena[untouched] == 7.0).all())
        x = torch.randn(2, 32, dtype=dtype, device=DEVICE)
        y = torch.zeros(2, 32, dtype=dtype, device=DEVICE)
        run_step(backend, [0, 1, 2], [0, -1], [table]).apply(0, Q_ONLY, x, y)
        w = weights[(0, "q_proj")]
        want = 0.5 * (x[0].double().cpu() @ w.a.double().T) @ w.b.double().T
        torch.testing.assert_close(y[0].double().cpu(), want, **TOL[dtype])
        assert not y[1].any()
        assert uid in backend
        backend.drop_adapter(uid)
        assert uid not in backend


# The model-wide sites as a step applies them to a vocabulary of VOCAB (the sample rows: all rows).
SITE_GROUPS = (LoraGroup("embed_tokens", ("embed_tokens",), VOCAB, (32,), GATHER),
               LoraGroup("lm_head", ("lm_head",), 32, (VOCAB,), SAMPLES))


def _packed_spec(uid: int, rank: int, stored: str | None, dora: bool) -> AdapterSpec:
    """Every layer module (DoRA or not), an embed_tokens LoRA (``A`` stored transposed) and an
    lm_head one (``B^T`` and ``g`` rows of VOCAB: longer than a page, stored in pieces)."""
    modules = {(layer, m): ModuleSpec(rank + layer, 0.5 + uid / 4, *SHAPES[m], dora=dora)
               for layer in (0, 1) for m in SHAPES}
    modules[(0, "embed_tokens")] = ModuleSpec(rank, 0.75, VOCAB, 32, a_transposed=True)
    modules[(0, "lm_head")] = ModuleSpec(rank + 1, 0.25, 32, VOCAB, dora=dora)
    return AdapterSpec(uid, f"a{uid}", modules, stored)


def _bf16_exact_weights(table: AdapterPageTable, seed: int) -> dict[tuple[int, str], LoraWeights]:
    """Random weights exactly representable in bf16 (so bf16 storage loses nothing), with a DoRA
    scale ``g`` in 0.5..1.5 for DoRA modules."""
    gen = torch.Generator().manual_seed(100 + seed)
    out = {}
    for key, w in _weights(table, torch.float32, seed).items():
        g = 0.5 + torch.rand(w.b.shape[0], generator=gen) if table.modules[key].dora else None
        g = None if g is None else g.bfloat16().float()
        out[key] = LoraWeights(w.a.bfloat16().float(), w.b.bfloat16().float(), w.rank, w.scale, dora_scale=g)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", BACKENDS)
def test_packed_adapters_in_their_storage_dtypes(name: str, dtype: torch.dtype) -> None:
    """Adapters placed by the pool (rows of several matrices and layers sharing pages, each matrix
    from its own row of its first page), some stored in bf16 when the backend reads bf16 rows (in an
    fp32 arena: half the bytes, and lm_head's pieces twice as long), with DoRA scale rows, a gathered
    embedding and lm_head rows in pieces among them, give the dense result of their weights."""
    arena = torch.zeros(512, LAYOUT.page_elems, dtype=dtype, device=DEVICE)
    backend = make_backend(name, arena)
    residency = AdapterResidency(PagePool(512), replace(LAYOUT, itemsize=arena.element_size()))
    bf16_rows = torch.bfloat16 in backend.storage_dtypes
    tables, dense = [], []
    plans = ((3, None, False), (8, "bfloat16", True), (1, "bfloat16", False), (16, None, True))
    for uid, (rank, stored, dora) in enumerate(plans, start=1):
        stored = stored if bf16_rows else None
        table = residency.load(_packed_spec(uid, rank, stored, dora))
        assert table.dtype == stored
        weights = _bf16_exact_weights(table, seed=uid)
        backend.write_adapter(table, weights)
        tables.append(table)
        dense.append({key: Dense(w.a.to(dtype), w.b.to(dtype), w.scale,
                                 None if w.dora_scale is None else w.dora_scale.to(dtype))
                      for key, w in weights.items()})
    assert any(len(m.a_pages) > 1 or m.a_row0 for t in tables for m in t.modules.values())  # pages shared
    assert any(m.g_row0 for t in tables for m in t.modules.values())  # a scale row mid-page
    seg_starts, seg_slots = [0, 1, 2, 3, 4, 9, 10], [0, 1, 2, 3, 1, -1]
    step = run_step(backend, seg_starts, seg_slots, tables)
    gen = torch.Generator().manual_seed(9)
    for layer, group in [(layer, g) for layer in (0, 1) for g in GROUPS] + [(0, g) for g in SITE_GROUPS]:
        x = group_input(group, 10, dtype, gen)
        y = torch.randn(10, group.out_features, generator=gen).to(dtype)
        expected = dense_group(x, y, seg_starts, seg_slots, dense, layer, group)
        y_dev = y.to(DEVICE)
        step.apply(layer, group, x.to(DEVICE), y_dev)
        torch.testing.assert_close(y_dev.double().cpu(), expected, **TOL[dtype])
