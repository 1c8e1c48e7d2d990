"""kernels/page_rows.py against its references: every row's offset against the page layout's formula,
and the one-call write against ``write_matrix_rows`` (pool bytes identical), for fp32 and bf16 rows
and sources, strided sources (B read by column), rows that cross pages and rows longer than a page.
The native backend's write of bf16 host factors must leave the same bytes as of their fp32 copies."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from adapter_store.peft_format import LoraWeights
from kernels.lora_native import MODULE_INDEX, AdapterRows, NativeLoraBackend
from kernels.lora_pages import storage_view, write_matrix_rows
from kernels.native_lib import available
from kernels.page_rows import row_offsets, write_adapter_rows
from server.adapter_residency import AdapterResidency, AdapterSpec, ModuleSpec
from server.pool import PagePool
from tests.lora_cases import LAYOUT

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler for the native kernels")
ELEMS = LAYOUT.page_elems  # 128


def _reference_offsets(placements, elems: int, item: int) -> list[int]:
    out = []
    for pages, row0, rows, row_len in placements:
        rpp = elems // row_len
        out += [(pages[(row0 + j) // rpp] * elems + (row0 + j) % rpp * row_len) * item for j in range(rows)]
    return out


def test_row_offsets_follow_the_layout() -> None:
    rng = random.Random(5)
    placements = []
    for _ in range(50):
        row_len = rng.choice([1, 7, 37, 64, 128])
        rpp, rows, row0 = ELEMS // row_len, rng.randint(0, 40), rng.randint(0, 3)
        row0 = min(row0, rpp - 1)
        pages = tuple(rng.sample(range(1000), -(-(row0 + rows) // rpp) or 1))
        placements.append((pages, row0, rows, row_len))
    got = row_offsets(placements, ELEMS, 2)
    assert got.dtype == torch.int64 and got.tolist() == _reference_offsets(placements, ELEMS, 2)
    with pytest.raises(ValueError, match="fit"):
        row_offsets([((1, 2), 0, 9, 37)], ELEMS, 4)  # 3 rows of 37 to a page
    with pytest.raises(ValueError, match="outside"):
        row_offsets([((1, 2), 0, 6, 37)], ELEMS, 4, num_pages=2)
    assert row_offsets([((1, 2), 0, 6, 37)], ELEMS, 4, num_pages=3).numel() == 6


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("arena_dtype", "rows_dtype"), [(torch.float32, None), (torch.bfloat16, None),
                                                        (torch.float32, "bfloat16")])
def test_write_leaves_the_bytes_of_write_matrix_rows(src_dtype, arena_dtype, rows_dtype) -> None:
    """fp32 sources into bf16 rows: rounded as torch rounds (values not exact in bf16 on purpose)."""
    gen = torch.Generator().manual_seed(11)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 3).to(src_dtype)

    mats = [(rnd(5, 37), (9, 2), 1),  # from row 1 of its first page, across two pages
            (rnd(48, 7).t(), (4, 0, 11, 5), 0),  # strided, like B.t()
            (rnd(3, 300), (12, 13, 14, 15, 16, 17, 18, 19, 20), 0),  # rows longer than a page: cut
            (rnd(1, 37), (9,), 0),
            (rnd(0, 37), (21,), 0)]
    ref_arena = torch.full((24, ELEMS), 7.0, dtype=arena_dtype)
    arena = ref_arena.clone()
    for rows, pages, row0 in mats:
        write_matrix_rows(storage_view(ref_arena, rows_dtype), pages, rows, row0)
    write_adapter_rows(storage_view(arena, rows_dtype), mats)
    assert torch.equal(arena.view(torch.uint8), ref_arena.view(torch.uint8))
    with pytest.raises(ValueError, match="outside"):
        write_adapter_rows(storage_view(arena, rows_dtype), [(rnd(2, 37), (24,), 0)])


def _spec(uid: int, stored: str | None) -> AdapterSpec:
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "down_proj": (48, 32)}
    modules = {(layer, m): ModuleSpec(3 + 5 * layer, 0.5, *shapes[m]) for layer in (0, 1) for m in shapes}
    return AdapterSpec(uid, f"a{uid}", modules, stored)


@pytest.mark.parametrize("stored", [None, "bfloat16"])
def test_native_write_of_bf16_host_factors_matches_their_fp32_copies(stored: str | None) -> None:
    """The loader keeps a plain bf16 file's factors bf16; written into fp32 or bf16 rows they must
    give the pages the bytes the old fp32 host copies gave, and rows whose offsets match them."""
    residency = AdapterResidency(PagePool(64), replace(LAYOUT, itemsize=4))
    table = residency.load(_spec(1, stored))
    assert any(len(m.a_pages) > 1 for m in table.modules.values())  # ranks that cross pages
    gen = torch.Generator().manual_seed(2)
    bf16 = {key: LoraWeights(torch.randn(m.rank, m.in_features, generator=gen).bfloat16(),
                             torch.randn(m.out_features, m.rank, generator=gen).bfloat16(), m.rank, m.scale)
            for key, m in table.modules.items()}
    fp32 = {key: LoraWeights(w.a.float(), w.b.float(), w.rank, w.scale) for key, w in bf16.items()}
    arenas = []
    for weights in (fp32, bf16):
        arena = torch.full((64, ELEMS), 7.0)
        NativeLoraBackend(arena, LAYOUT).write_adapter(table, weights)
        arenas.append(arena)
    assert torch.equal(arenas[0].view(torch.uint8), arenas[1].view(torch.uint8))
    rows = AdapterRows(table, LAYOUT.num_layers, arenas[0])
    view = storage_view(arenas[0], stored).contiguous().view(torch.uint8).view(-1)
    item = 2 if stored else 4
    (layer, name), m = next(iter(table.modules.items()))
    first_b = int(rows.desc[layer, MODULE_INDEX[name], 2] - rows.rows.data_ptr()) // 8  # B^T rows' offsets
    for j in range(m.rank):
        at = int(rows.rows[first_b + j])
        got = view[at : at + m.out_features * item].view(torch.bfloat16 if stored else torch.float32)
        assert torch.equal(got.float(), bf16[(layer, name)].b[:, j].float())
