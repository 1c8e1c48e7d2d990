"""Rank-proportional adapter pages (server/adapter_packing.py): streams by row length, exact page ids,
and how full the pages are on SmolLM2's shapes."""

from __future__ import annotations

import pytest

from server.adapter_packing import fill_ratio, pack
from server.adapter_residency import AdapterResidency, AdapterSpec, ModuleSpec
from server.model_config import ModelConfig
from server.page_layout import PageLayout
from server.pool import PagePool

# 24-element pages: rows of 8 fit 3 per page, rows of 12 fit 2, rows of 4 fit 6.
LAYOUT = PageLayout(page_elems=24, block_size=3, num_layers=2, num_kv_heads=1, head_dim=4)
SMOLLM2 = ModelConfig.from_hf_dict(dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, rms_norm_eps=1e-5))


def spec(rank: int, modules: dict[str, tuple[int, int]], layers: int = 2,
         dtype: str | None = None) -> AdapterSpec:
    return AdapterSpec(1, "a", {(layer, m): ModuleSpec(rank, 2.0, i, o) for layer in range(layers)
                                for m, (i, o) in modules.items()}, dtype)


def test_streams_by_row_length_with_exact_pages() -> None:
    # q: 8 -> 8 (A and B^T rows of 8); k: 8 -> 4 (A rows of 8, B^T rows of 4)
    s = spec(2, {"q_proj": (8, 8), "k_proj": (8, 4)})
    packing = s.packing(LAYOUT)
    # rows of 8: per layer q.A (2), q.B^T (2), k.A (2) = 12 rows -> 4 pages; rows of 4: 4 rows -> 1 page
    assert [(st.row_len, st.rows_per_page, st.num_rows) for st in packing.streams] == [(8, 3, 12), (4, 6, 4)]
    table = AdapterResidency(PagePool(8), LAYOUT).load(s)
    assert table.all_pages() == [0, 1, 2, 3, 4]
    q0, k0, q1, k1 = (table.modules[(layer, m)] for layer in (0, 1) for m in ("q_proj", "k_proj"))
    assert (q0.a_pages, q0.a_row0, q0.b_pages, q0.b_row0) == ((0,), 0, (0, 1), 2)
    assert (k0.a_pages, k0.a_row0, k0.b_pages, k0.b_row0) == ((1,), 1, (4,), 0)
    assert (q1.a_pages, q1.a_row0, q1.b_pages, q1.b_row0) == ((2,), 0, (2, 3), 2)
    assert (k1.a_pages, k1.a_row0, k1.b_pages, k1.b_row0) == ((3,), 1, (4,), 2)


def test_pages_follow_the_pools_order() -> None:
    pool = PagePool(10)
    pool.allocate(3)
    pool.free([1, 0])  # empty list now 1, 0 (freed pages first), then 3..
    table = AdapterResidency(pool, LAYOUT).load(spec(1, {"q_proj": (8, 8)}))  # 4 rows of 8: 2 pages
    assert table.all_pages() == [1, 0]
    q1 = table.modules[(1, "q_proj")]  # rows 2 and 3 of the stream
    assert (q1.a_pages, q1.a_row0, q1.b_pages, q1.b_row0) == ((1,), 2, (0,), 0)


def test_bf16_rows_take_half_the_pages() -> None:
    s32, s16 = spec(6, {"q_proj": (8, 8)}), spec(6, {"q_proj": (8, 8)}, dtype="bfloat16")
    assert s32.pages_needed(LAYOUT) == 8  # 24 rows of 8, 3 a page
    assert s16.pages_needed(LAYOUT) == 4  # 6 a page
    table = AdapterResidency(PagePool(8), LAYOUT).load(s16)
    assert table.dtype == "bfloat16" and table.modules[(1, "q_proj")].b_row0 == 0


@pytest.mark.parametrize("rank", [4, 5, 8, 13, 16, 32, 64])
@pytest.mark.parametrize("modules", ["qkvo", "all"])
@pytest.mark.parametrize(("dtype", "goal"), [(None, 0.93), ("bfloat16", 0.96)])
def test_smollm2_pages_are_at_least_90_percent_weights(rank: int, modules: str, dtype: str | None,
                                                       goal: float) -> None:
    layout = PageLayout.for_model(SMOLLM2)
    shapes = SMOLLM2.linear_shapes()
    names = ("q_proj", "k_proj", "v_proj", "o_proj") + (("gate_proj", "up_proj", "down_proj")
                                                         if modules == "all" else ())
    s = spec(rank, {m: shapes[m] for m in names}, layers=30, dtype=dtype)
    itemsize = 2 if dtype else None
    assert fill_ratio(s.packing(layout), layout, itemsize) >= goal


def test_small_ranks_no_longer_take_a_page_per_matrix() -> None:
    layout = PageLayout.for_model(SMOLLM2)
    shapes = SMOLLM2.linear_shapes()
    qkvo = {m: shapes[m] for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    # Before packing every (layer, module, A or B^T) took a page: 240 pages at rank 1, 4 and 8.
    assert [spec(r, qkvo, layers=30).pages_needed(layout) for r in (1, 4, 8)] == [20, 80, 159]


def test_place_checks_the_page_count() -> None:
    s = spec(2, {"q_proj": (8, 8)})
    with pytest.raises(ValueError, match="needs 3 pages"):
        pack(s.modules, LAYOUT).place(1, s.modules, [0, 1])
