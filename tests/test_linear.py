"""``server.layers.Linear``: oneDNN-prepacked weights give F.linear's result up to summation order."""

import pytest
import torch
import torch.nn.functional as F

from server.layers import Linear


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_prepacked_linear_matches_f_linear(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 40, generator=gen)
    x = torch.randn(rows, 40, generator=gen)
    packed, plain = Linear(w, prepack=True), Linear(w, prepack=False)
    assert plain.packed is None and torch.equal(plain(x), F.linear(x, w))
    if torch.backends.mkldnn.is_available():
        assert packed.packed is not None and packed.weight is None  # one copy of the weight
    torch.testing.assert_close(packed(x), F.linear(x, w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed(x[::2]), F.linear(x[::2], w), atol=1e-5, rtol=1e-5)  # strided rows


def test_linear_bf16_falls_back_or_packs() -> None:
    w = torch.randn(32, 16).bfloat16()
    x = torch.randn(5, 16).bfloat16()
    layer = Linear(w, prepack=True)  # packs only where oneDNN computes bf16 natively (AVX-512/AMX)
    torch.testing.assert_close(layer(x).float(), F.linear(x, w).float(), atol=2e-2, rtol=2e-2)
