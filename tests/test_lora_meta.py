"""The Triton LoRA backend's host-side metadata (kernels/lora_meta.py): exact tiles and descriptor words."""

import numpy as np

from kernels.lora_meta import HDR_FIELDS, adapter_block, plan_tiles
from server.model_config import KERNEL_MODULES
from server.page_layout import AdapterPageTable, LoraMatrixPages


def test_decode_steps_get_one_row_tiles_padded_to_a_power_of_two() -> None:
    tiles = plan_tiles([0, 1, 2, 3, 4, 5, 6], [0, -1, 1, 0, 2, 1], [0, 100, 200])
    assert tiles.short_m == 1
    assert tiles.items.tolist() == [[0, 1, 0], [2, 3, 100], [3, 4, 0], [4, 5, 200], [5, 6, 100],
                                    [0, 0, -1], [0, 0, -1], [0, 0, -1]]


def test_short_and_long_segments_share_one_list() -> None:
    # segments: 3 tokens of slot 1, an empty one, 35 tokens of slot 0, 2 tokens without adapter.
    # The long segment's last tile has 3 rows: <= short_m, so it runs as a short tile (same result).
    tiles = plan_tiles([0, 3, 3, 38, 40], [1, 0, 0, -1], [0, 50])
    assert tiles.short_m == 4
    assert tiles.items.tolist() == [[0, 3, 50], [3, 38, 0], [19, 38, 0], [35, 38, 0]]
    assert plan_tiles([0, 2, 4], [-1, -1], []) is None


def test_adapter_block_words() -> None:
    q = LoraMatrixPages(rank=3, scale=0.25, in_features=8, out_features=8, a_pages=(7,), b_pages=(9, 4))
    down = LoraMatrixPages(rank=5, scale=2.0, in_features=16, out_features=8, a_pages=(1, 2), b_pages=(3,),
                           g_pages=(11,), a_row0=1, b_row0=2, g_row0=3)  # DoRA: g's page ids follow B^T's
    head = LoraMatrixPages(rank=2, scale=1.0, in_features=8, out_features=300, a_pages=(5,), b_pages=(6, 8),
                           replace=True)  # a full copy of lm_head
    table = AdapterPageTable(1, {(0, "q_proj"): q, (1, "down_proj"): down, (0, "lm_head"): head})
    block = adapter_block(table, num_layers=2)
    assert block.max_rank == 5 and block.model_modules == {"lm_head"}
    m = len(KERNEL_MODULES)
    header = block.data[: 2 * m * HDR_FIELDS].reshape(2, m, HDR_FIELDS)
    start = header.size
    assert header[0, 0, 0] == 3 and header[0, 0, 2:].tolist() == [start, start + 1, 0, 8, 0, 0, 0, 0]
    assert np.array([header[0, 0, 1]], dtype=np.int32).view(np.float32)[0] == 0.25
    d = KERNEL_MODULES.index("down_proj")
    assert header[1, d, 0] == 5
    assert header[1, d, 2:].tolist() == [start + 3, start + 5, start + 6, 8, 0, 1, 2, 3]  # rows 0: 1, 2, 3
    assert np.array([header[1, d, 1]], dtype=np.int32).view(np.float32)[0] == 2.0
    h = KERNEL_MODULES.index("lm_head")
    assert header[0, h, 0] == 2 and header[0, h, 2:].tolist() == [start + 7, start + 8, 0, 300, 1, 0, 0, 0]
    assert block.data[start:].tolist() == [7, 9, 4, 1, 2, 3, 11, 5, 6, 8]
    assert (header[:, :, 0] != 0).sum() == 3  # every other (layer, module): rank 0
