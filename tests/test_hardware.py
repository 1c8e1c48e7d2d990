"""The serving dtype "auto" on a CPU: bfloat16 only with AMX (server/hardware.py)."""

from __future__ import annotations

import pytest
import torch

from server import hardware

CPU = torch.device("cpu")


@pytest.mark.parametrize(("flags", "onednn_bf16", "want"), [
    ({"avx2", "fma"}, False, torch.float32),  # AVX2 only: bf16 is emulated
    ({"avx2", "avx512f", "avx512_bf16"}, True, torch.float32),  # Zen 4: native bf16, no AMX
    ({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, True, torch.bfloat16),
    ({"amx_bf16"}, False, torch.float32),  # a oneDNN that can't use it
])
def test_auto_is_bf16_only_with_amx(monkeypatch, flags: set[str], onednn_bf16: bool,
                                    want: torch.dtype) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    assert hardware.resolve_dtype("auto", CPU) == want
    assert hardware.resolve_dtype("bfloat16", CPU) == torch.bfloat16  # an explicit dtype is kept
