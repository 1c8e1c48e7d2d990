"""Which dtype an adapter's rows take in the pool (server/adapter_storage.py): bf16 only where it loses
nothing (``auto``) or the user asked for it, and only where the LoRA backend reads bf16 rows."""

from __future__ import annotations

import torch

from adapter_store.peft_config import parse_adapter_config
from adapter_store.peft_format import LoraWeights, ParsedAdapter
from server.adapter_storage import AdapterStorage

F32, BF16 = torch.float32, torch.bfloat16
BOTH = (F32, BF16)  # what the native and torch backends read


def parsed(source: torch.dtype | None, dora_scale: torch.Tensor | None = None,
           scale: float = 1.0, replace: bool = False) -> ParsedAdapter:
    """One q_proj module whose weights came from a file of ``source`` dtype (as loaded: fp32); A
    scaled by ``scale`` at load (as a full copy joined with its LoRA: ``replace``)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(shape, generator=gen).to(BF16).float() for shape in ((4, 8), (8, 4)))
    config = parse_adapter_config({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                   "target_modules": ["q_proj"]})
    w = LoraWeights(a=a * scale, b=b, rank=4, scale=1.0, dora_scale=dora_scale, replace=replace)
    return ParsedAdapter(config=config, weights={(0, "q_proj"): w}, checksum="0" * 64, source_dtype=source)


def test_auto_stores_bf16_files_in_bf16_when_lossless() -> None:
    auto = AdapterStorage("auto", F32, BOTH)
    assert auto.dtype_for(parsed(BF16)) == "bfloat16"
    assert auto.dtype_for(parsed(F32)) is None  # an fp32 file keeps its precision
    assert auto.dtype_for(parsed(None)) is None  # mixed dtypes in the file


def test_auto_keeps_the_model_dtype_for_rows_computed_at_load() -> None:
    """A DoRA scale is computed in fp32 from the base's norms: bf16 would round it (every output of
    the module moves); a row scaled at load (a full copy joined with its LoRA) likewise."""
    auto = AdapterStorage("auto", F32, BOTH)
    g = 1 + torch.rand(8, generator=torch.Generator().manual_seed(1)) / 100
    assert auto.dtype_for(parsed(BF16, dora_scale=g)) is None
    assert auto.dtype_for(parsed(BF16, dora_scale=g.to(BF16).float())) == "bfloat16"  # exact: kept
    assert auto.dtype_for(parsed(BF16, scale=1 / 3, replace=True)) is None
    assert auto.dtype_for(parsed(BF16, scale=0.5, replace=True)) == "bfloat16"  # exact


def test_explicit_modes_and_backends_without_bf16_rows() -> None:
    g = torch.full((8,), 1 / 3)
    assert AdapterStorage("bfloat16", F32, BOTH).dtype_for(parsed(F32, dora_scale=g)) == "bfloat16"
    assert AdapterStorage("model", F32, BOTH).dtype_for(parsed(BF16)) is None
    assert AdapterStorage("auto", F32, (F32,)).dtype_for(parsed(BF16)) is None  # e.g. Triton
    assert AdapterStorage("bfloat16", BF16, BOTH).dtype_for(parsed(F32)) is None  # the model's own
