"""Triton LoRA kernels (reading pages in place) on the mixed-rank case of the reference tests.

Without a GPU these run under TRITON_INTERPRET=1 (set in conftest.py), so shapes are small: K, N in
32..48 (48 exercises the masks of 64-wide tiles), one 150-token segment (10 prefill tiles of 16
rows, ``tl.dot``) and a handful of decode tokens (1- to 4-row tiles, no ``tl.dot``), in one step.
"""

from __future__ import annotations

import pytest
import torch
from lora_cases import LAYOUT, RANKS, SEG_LENS, SEG_SLOTS, build_args, dense_delta

from kernels.lora import LoraSegments
from kernels.step_buffer import StepBuffer, StepPack
from server.model_config import LoraGroup
from server.page_layout import AdapterPageTable

pytestmark = pytest.mark.slow

triton_lora = pytest.importorskip("kernels.triton_lora")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32: same products, different summation order. bf16: the prefill tiles round v to bf16 before
# the expand (as the reference does) and the decode tiles keep it in fp32, so a few bf16 ulps.
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}


@pytest.mark.parametrize(("k", "n", "dtype"), [(32, 48, torch.float32), (48, 32, torch.bfloat16)])
def test_mixed_ranks_skewed_segments(k: int, n: int, dtype: torch.dtype) -> None:
    arena, args, dense = build_args(RANKS, SEG_LENS, SEG_SLOTS, k, n, dtype, seed=1)
    arena = arena.to(DEVICE)
    tables = [AdapterPageTable(10 + i, {} if m is None else {(1, "q_proj"): m})
              for i, m in enumerate(args.mats)]
    group = LoraGroup("q", ("q_proj",), k, (n,))
    backend = triton_lora.TritonLoraBackend(arena, LAYOUT)
    seg = args.segments
    pack = StepPack()
    step = backend.prepare_step(LoraSegments(seg.seg_starts, seg.seg_slots), tables, pack)
    assert step.short_m == 4 and step.num_tiles == 32  # 11 prefill tiles + 6 decode-shaped, padded
    step.bind(StepBuffer(arena.device).upload(pack))
    x = torch.randn(seg.num_tokens, k).to(dtype)
    fused = torch.randn(x.shape[0], n + 16).to(dtype)
    before = fused.clone()
    y = fused[:, 8 : 8 + n].to(DEVICE)  # a strided column slice of a fused output
    step.apply(1, group, x.to(DEVICE), y)
    expected = before[:, 8 : 8 + n].double() + dense_delta(x, args, dense)
    torch.testing.assert_close(y.double().cpu(), expected, **TOL[dtype])
    if DEVICE == "cpu":
        torch.testing.assert_close(fused[:, :8], before[:, :8])
        torch.testing.assert_close(fused[:, 8 + n :], before[:, 8 + n :])
    y0 = torch.randn(x.shape[0], n, dtype=dtype, device=DEVICE)
    y_other = y0.clone()
    step.apply(0, group, x.to(DEVICE), y_other)  # no adapter has layer 0: nothing changes
    assert torch.equal(y_other, y0)
