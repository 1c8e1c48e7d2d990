"""The fused CPU LoRA path (``LoraBatch.apply_group``, kernels/lora_cpu.py) against per-module ``apply``,
which test_lora_ref.py checks against a dense float64 computation."""

import pytest
import torch

from kernels.lora import GatherCache, LoraBatch
from tests.lora_cases import LAYOUT
from tests.test_lora_ref import SHAPES, TOL, _model_adapters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_group_equals_per_module(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    arena = torch.randn(512, LAYOUT.page_elems).to(dtype)
    adapters, _ = _model_adapters(arena, SHAPES)
    seg_starts, seg_slots = [0, 2, 3, 3, 7, 8, 9], [1, -1, 0, 2, 0, 1]  # slot 0 twice, not sorted
    compute = torch.float32 if dtype == torch.bfloat16 else None
    x = torch.randn(9, 32).to(dtype)
    for layer in (0, 1):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("up_proj",)):
            widths = tuple(SHAPES[m][1] for m in group)
            base = torch.randn(9, sum(widths)).to(dtype)
            ref, got = base.clone(), base.clone()
            per_module = LoraBatch(arena, LAYOUT, seg_starts, seg_slots, adapters, "torch",
                                   GatherCache(compute))
            col = 0
            for m, w in zip(group, widths, strict=True):
                per_module.apply(layer, m, x, ref[:, col : col + w])
                col += w
            fused = LoraBatch(arena, LAYOUT, seg_starts, seg_slots, adapters, "torch", GatherCache(compute))
            fused.apply_group(layer, group, x, got, widths)
            # Both paths round the same fp32 sums once into y's dtype; only summation order differs.
            torch.testing.assert_close(got.double(), ref.double(), **TOL[dtype])


def test_fused_weights_are_cached_per_uid_until_dropped() -> None:
    torch.manual_seed(0)
    arena = torch.randn(512, LAYOUT.page_elems)
    adapters, _ = _model_adapters(arena, SHAPES)
    cache = GatherCache()
    batch = LoraBatch(arena, LAYOUT, [0, 1, 2], [0, 1], adapters[:2], "torch", cache)
    qkv = ("q_proj", "k_proj", "v_proj")
    widths = tuple(SHAPES[m][1] for m in qkv)
    batch.apply_group(0, qkv, torch.randn(2, 32), torch.zeros(2, sum(widths)), widths)
    uids = [a.uid for a in adapters[:2]]
    assert all(uid in cache for uid in uids) and len(cache) == 2
    cache.drop(uids[0])
    assert uids[0] not in cache and uids[1] in cache and len(cache) == 1
