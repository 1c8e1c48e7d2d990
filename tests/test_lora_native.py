"""The C LoRA kernel's own cases (kernels/lora_native.c): vector tails, operand checks, the build cache,
the batched row copy and backend selection. tests/test_lora_backends.py checks it against the dense
oracle like every other backend."""

import pytest
import torch

from kernels.backend import lora_backend_name, select_lora_backend
from kernels.lora import LoraSegments
from kernels.lora_native import NativeLoraBackend
from kernels.lora_pages import read_matrix_rows, storage_view, write_matrix_rows
from kernels.lora_torch import TorchLoraBackend
from kernels.native_lib import available, build
from kernels.page_rows import write_adapter_rows
from kernels.step_buffer import StepPack
from server.model_config import LoraGroup
from server.page_layout import AdapterPageTable
from tests.lora_cases import GROUPS, LAYOUT, PageAlloc, add_matrix, model_adapters

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler for the native LoRA kernel")
TOL32 = {"atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize("rank", [1, 5, 16])
@pytest.mark.parametrize(("rows_dtype", "k", "widths"), [(None, 37, (21, 40)), (None, 75, (21, 120)),
                                                         ("bfloat16", 75, (21, 120))])
def test_native_vector_tails_against_dense(rank: int, rows_dtype: str | None, k: int,
                                           widths: tuple[int, int]) -> None:
    """Widths that are not multiples of the kernel's 8/16-float vectors, odd ranks, 1..7-token runs;
    75 and 120: past the 2 x 16-float blocks of the fp32 and bf16 (de-interleaved) loops, with their
    whole-vector and scalar tails, in both row dtypes."""
    group = LoraGroup("gate_up", ("gate_proj", "up_proj"), k, widths)
    gen = torch.Generator().manual_seed(rank)
    arena = torch.randn(256, LAYOUT.page_elems)
    alloc = PageAlloc(256, seed=rank)
    tables, dense = [], []
    for uid, r in ((1, rank), (2, rank + 2)):
        mats = {(0, m): add_matrix(storage_view(arena, rows_dtype), alloc, r, k, w, gen)
                for m, w in zip(group.modules, group.widths, strict=True)}
        tables.append(AdapterPageTable(uid, {key: m for key, (m, _) in mats.items()}, dtype=rows_dtype))
        dense.append({key: d for key, (_, d) in mats.items()})
    seg_starts, seg_slots = [0, 7, 8, 11, 13], [0, 1, -1, 1]
    x = torch.randn(13, k)
    y = torch.randn(13, sum(group.widths))
    expected = y.double().clone()
    for s, slot in enumerate(seg_slots):
        for t in range(seg_starts[s], seg_starts[s + 1]):
            for m, col, w in zip(group.modules, group.cols, group.widths, strict=True):
                if slot >= 0:
                    d = dense[slot][(0, m)]
                    expected[t, col : col + w] += d.scale * (x[t].double() @ d.a.double().T) @ d.b.double().T
    backend = NativeLoraBackend(arena, LAYOUT)
    backend.prepare_step(LoraSegments(tuple(seg_starts), tuple(seg_slots)), tables, StepPack()).apply(
        0, group, x, y)
    torch.testing.assert_close(y.double(), expected, **TOL32)


def test_native_refuses_bad_operands() -> None:
    arena = torch.randn(1024, LAYOUT.page_elems)
    adapters, _ = model_adapters(arena)
    step = NativeLoraBackend(arena, LAYOUT).prepare_step(LoraSegments((0, 2), (0,)), adapters, StepPack())
    qkv = GROUPS[0]
    with pytest.raises(ValueError, match="dtype"):
        step.apply(0, qkv, torch.randn(2, 32, dtype=torch.float64), torch.zeros(2, 64))
    with pytest.raises(ValueError, match="rows"):
        step.apply(0, qkv, torch.randn(3, 32), torch.zeros(3, 64))
    with pytest.raises(ValueError, match="native"):
        NativeLoraBackend(arena.half(), LAYOUT)


def test_backend_selection_and_cached_build(tmp_path) -> None:
    cpu = torch.device("cpu")
    assert lora_backend_name(cpu, torch.float32, "torch") == "native"
    assert lora_backend_name(cpu, torch.float16, "torch") == "torch"
    assert lora_backend_name(cpu, torch.float32, "triton") == "triton"
    assert lora_backend_name(cpu, torch.float32, "torch", "torch") == "torch"
    with pytest.raises(ValueError, match="native"):
        lora_backend_name(cpu, torch.float16, "torch", "native")
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        lora_backend_name(cpu, torch.float32, "torch", "cuda-magic")
    arena = torch.zeros(4, LAYOUT.page_elems)
    assert isinstance(select_lora_backend(arena, LAYOUT, "torch"), NativeLoraBackend)
    assert isinstance(select_lora_backend(arena.half(), LAYOUT, "torch"), TorchLoraBackend)
    first = build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert build(tmp_path) == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt


@pytest.mark.parametrize(("arena_dtype", "rows_dtype"), [(torch.float32, None), (torch.bfloat16, None),
                                                        (torch.float32, "bfloat16")])
def test_write_adapter_rows_matches_write_matrix_rows(arena_dtype: torch.dtype,
                                                      rows_dtype: str | None) -> None:
    gen = torch.Generator().manual_seed(3)
    # (rows, pages, row0): a matrix from row 1 of its first page; two sharing page 9 (rows of 37 fit
    # 3 to a 128-element page, 6 to a page of bf16 rows in an fp32 arena)
    mats = [(torch.randn(5, 37, generator=gen), (9, 2), 1),
            (torch.randn(48, 7, generator=gen).t(), (4, 0, 11, 5), 0),  # a strided source, like B.t()
            (torch.randn(1, 128, generator=gen), (6,), 0),
            (torch.randn(1, 37, generator=gen), (9,), 0)]
    ref = storage_view(torch.zeros(12, LAYOUT.page_elems, dtype=arena_dtype), rows_dtype)
    arena = torch.full((12, LAYOUT.page_elems), 7.0, dtype=arena_dtype)
    got = storage_view(arena, rows_dtype)
    for rows, pages, row0 in mats:
        write_matrix_rows(ref, pages, rows, row0)
    write_adapter_rows(got, mats)
    for rows, pages, row0 in mats:
        back = read_matrix_rows(got, pages, *rows.shape, row0)
        assert torch.equal(back, read_matrix_rows(ref, pages, *rows.shape, row0))
        assert torch.equal(back, rows.to(got.dtype))
    assert torch.equal(arena[3], torch.full((LAYOUT.page_elems,), 7.0, dtype=arena_dtype))  # untouched page
    with pytest.raises(ValueError, match="fit"):
        write_adapter_rows(got, [(torch.randn(99, 37), (1, 2), 0)])  # more rows than 2 pages hold
    with pytest.raises(ValueError, match="outside"):
        write_adapter_rows(got, [(torch.randn(2, 37), (12,), 0)])
