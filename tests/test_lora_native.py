"""The C LoRA kernel's own cases (kernels/lora_native.c): vector tails, operand checks, the build cache,
the batched row copy and backend selection. tests/test_lora_backends.py checks it against the dense
oracle like every other backend."""

import pytest
import torch

from kernels.backend import lora_backend_name, select_lora_backend
from kernels.lora import LoraSegments
from kernels.lora_native import NativeLoraBackend, write_adapter_rows
from kernels.lora_pages import read_matrix_rows, write_matrix_rows
from kernels.lora_torch import TorchLoraBackend
from kernels.native_lib import available, build
from kernels.step_buffer import StepPack
from server.model_config import LoraGroup
from server.page_layout import AdapterPageTable
from tests.lora_cases import GROUPS, LAYOUT, PageAlloc, add_matrix, model_adapters

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler for the native LoRA kernel")
TOL32 = {"atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize("rank", [1, 5, 16])
def test_native_vector_tails_against_dense(rank: int) -> None:
    """Widths that are not multiples of the kernel's 8/16-float vectors, odd ranks, 1..7-token runs."""
    group = LoraGroup("gate_up", ("gate_proj", "up_proj"), 37, (21, 40))
    gen = torch.Generator().manual_seed(rank)
    arena = torch.randn(256, LAYOUT.page_elems)
    alloc = PageAlloc(256, seed=rank)
    tables, dense = [], []
    for uid, r in ((1, rank), (2, rank + 2)):
        mats = {(0, m): add_matrix(arena, alloc, r, 37, w, gen) for m, w in zip(group.modules, group.widths,
                                                                               strict=True)}
        tables.append(AdapterPageTable(uid, {key: m for key, (m, _) in mats.items()}))
        dense.append({key: d for key, (_, d) in mats.items()})
    seg_starts, seg_slots = [0, 7, 8, 11, 13], [0, 1, -1, 1]
    x = torch.randn(13, 37)
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
