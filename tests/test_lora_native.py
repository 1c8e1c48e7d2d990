"""The C LoRA kernel (kernels/lora_native.c via ``LoraBatch(backend="native")``) against the torch
path, which test_lora_ref.py checks against a dense float64 computation."""

import pytest
import torch

from kernels.backend import select_lora_backend
from kernels.lora import GatherCache, LoraBatch
from kernels.lora_native import available, build, write_adapter_rows
from kernels.lora_pages import read_matrix_rows, write_matrix_rows
from server.page_layout import AdapterPageTable
from tests.lora_cases import LAYOUT, PageAlloc, add_matrix
from tests.test_lora_ref import SHAPES, TOL, _model_adapters

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler for the native LoRA kernel")

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("up_proj",), ("q_proj",))
# Slot 0 twice and unsorted, a no-adapter run, an empty segment, and runs longer than a 4-token tile.
SEG_STARTS, SEG_SLOTS = [0, 2, 3, 3, 12, 13, 19], [1, -1, 0, 2, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_matches_torch_path(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    arena = torch.randn(512, LAYOUT.page_elems).to(dtype)
    adapters, _ = _model_adapters(arena, SHAPES)
    t = SEG_STARTS[-1]
    x = torch.randn(t, 32).to(dtype)
    compute = torch.float32 if dtype == torch.bfloat16 else None
    for layer in (0, 1):
        for group in GROUPS:
            widths = tuple(SHAPES[m][1] for m in group)
            base = torch.randn(t, sum(widths)).to(dtype)
            ref, got = base.clone(), base.clone()
            LoraBatch(arena, LAYOUT, SEG_STARTS, SEG_SLOTS, adapters, "torch",
                      GatherCache(compute)).apply_group(layer, group, x, ref, widths)
            LoraBatch(arena, LAYOUT, SEG_STARTS, SEG_SLOTS, adapters, "native",
                      GatherCache()).apply_group(layer, group, x, got, widths)
            # Same fp32 products; only the summation order differs, and y is rounded once in both.
            torch.testing.assert_close(got.double(), ref.double(), **TOL[dtype])
            if layer == 0 and group == GROUPS[0]:
                assert not torch.equal(got, base)  # the case does add something


@pytest.mark.parametrize("rank", [1, 5, 16])
def test_native_vector_tails_against_dense(rank: int) -> None:
    """Widths that are not multiples of the kernel's 8/16-float vectors, odd ranks, 1..7-token runs."""
    k, widths = 37, (21, 40)
    gen = torch.Generator().manual_seed(rank)
    arena = torch.randn(256, LAYOUT.page_elems)
    alloc = PageAlloc(256, seed=rank)
    tables, dense = [], []
    for uid, r in ((1, rank), (2, rank + 2)):
        mats = {(0, "gate_proj"): add_matrix(arena, alloc, r, k, widths[0], gen),
                (0, "up_proj"): add_matrix(arena, alloc, r, k, widths[1], gen)}
        tables.append(AdapterPageTable(uid, {key: m for key, (m, _) in mats.items()}))
        dense.append({key: d for key, (_, d) in mats.items()})
    seg_starts, seg_slots = [0, 7, 8, 11, 13], [0, 1, -1, 1]
    x = torch.randn(13, k)
    y = torch.randn(13, sum(widths))
    expected = y.double().clone()
    for s, slot in enumerate(seg_slots):
        for t in range(seg_starts[s], seg_starts[s + 1]):
            col = 0
            for m, w in zip(("gate_proj", "up_proj"), widths, strict=True):
                if slot >= 0:
                    d = dense[slot][(0, m)]
                    expected[t, col : col + w] += d.scale * (x[t].double() @ d.a.double().T) @ d.b.double().T
                col += w
    LoraBatch(arena, LAYOUT, seg_starts, seg_slots, tables, "native").apply_group(
        0, ("gate_proj", "up_proj"), x, y, widths)
    torch.testing.assert_close(y.double(), expected, **TOL[torch.float32])


def test_native_per_module_apply_into_column_slice() -> None:
    torch.manual_seed(1)
    arena = torch.randn(512, LAYOUT.page_elems)
    adapters, _ = _model_adapters(arena, SHAPES)
    t = SEG_STARTS[-1]
    x = torch.randn(t, 32)
    fused_ref = torch.randn(t, 64 + 48)
    fused_got = fused_ref.clone()
    ref = LoraBatch(arena, LAYOUT, SEG_STARTS, SEG_SLOTS, adapters, "torch")
    got = LoraBatch(arena, LAYOUT, SEG_STARTS, SEG_SLOTS, adapters, "native")
    for batch, y in ((ref, fused_ref), (got, fused_got)):
        batch.apply(0, "gate_proj", x, y[:, 64:])  # a strided view: rows 112 apart
    torch.testing.assert_close(fused_got, fused_ref, **TOL[torch.float32])
    assert torch.equal(fused_got[:, :64], fused_ref[:, :64])


def test_native_rows_are_cached_per_uid_and_dropped() -> None:
    arena = torch.randn(512, LAYOUT.page_elems)
    adapters, _ = _model_adapters(arena, SHAPES)
    cache = GatherCache()
    LoraBatch(arena, LAYOUT, [0, 1, 2], [0, 2], adapters, "native", cache)
    assert adapters[0].uid in cache and adapters[2].uid in cache and len(cache) == 2
    cache.drop(adapters[0].uid)
    assert adapters[0].uid not in cache and len(cache) == 1


def test_native_refuses_bad_operands() -> None:
    arena = torch.randn(512, LAYOUT.page_elems)
    adapters, _ = _model_adapters(arena, SHAPES)
    batch = LoraBatch(arena, LAYOUT, [0, 2], [0], adapters, "native")
    with pytest.raises(ValueError, match="dtype"):
        batch.apply_group(0, ("q_proj",), torch.randn(2, 32, dtype=torch.float64), torch.zeros(2, 32), (32,))
    with pytest.raises(ValueError, match="rows"):
        batch.apply_group(0, ("q_proj",), torch.randn(3, 32), torch.zeros(3, 32), (32,))
    with pytest.raises(ValueError, match="native"):
        LoraBatch(arena.half(), LAYOUT, [0, 2], [0], adapters, "native")


def test_backend_selection_and_cached_build(tmp_path) -> None:
    cpu = torch.device("cpu")
    assert select_lora_backend(cpu, torch.float32, "torch") == "native"
    assert select_lora_backend(cpu, torch.float16, "torch") == "torch"
    assert select_lora_backend(cpu, torch.float32, "triton") == "triton"
    assert select_lora_backend(cpu, torch.float32, "torch", "torch") == "torch"
    with pytest.raises(ValueError, match="native"):
        select_lora_backend(cpu, torch.float16, "torch", "native")
    first = build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert build(tmp_path) == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_adapter_rows_matches_write_matrix_rows(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    mats = [(torch.randn(5, 37, generator=gen), (9, 2)),
            (torch.randn(48, 7, generator=gen).t(), (4, 0, 11, 5)),  # a strided source, like B.t()
            (torch.randn(1, 128, generator=gen), (6,))]
    ref = torch.zeros(12, LAYOUT.page_elems, dtype=dtype)
    got = torch.full((12, LAYOUT.page_elems), 7.0, dtype=dtype)
    for rows, pages in mats:
        write_matrix_rows(ref, pages, rows)
    write_adapter_rows(got, LAYOUT.page_elems, mats)
    for rows, pages in mats:
        back = read_matrix_rows(got, pages, *rows.shape)
        assert torch.equal(back, read_matrix_rows(ref, pages, *rows.shape))
        assert torch.equal(back, rows.to(dtype))
    assert torch.equal(got[3], torch.full((LAYOUT.page_elems,), 7.0, dtype=dtype))  # untouched page
    with pytest.raises(ValueError, match="fit"):
        write_adapter_rows(got, LAYOUT.page_elems, [(torch.randn(9, 37), (1, 2))])  # 9 rows > 2 pages x 3
    with pytest.raises(ValueError, match="outside"):
        write_adapter_rows(got, LAYOUT.page_elems, [(torch.randn(2, 37), (12,))])
