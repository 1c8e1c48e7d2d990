"""What the Triton LoRA kernels read for a step, built on the host (numpy only: no torch, no triton).

Everything goes into the step's one upload (kernels/step_buffer.py) as two kinds of int32 data:

**Adapter blocks** (section ``lora_desc``). Per resident adapter, built once from its page table and
cached until it is evicted::

    header [num_layers, len(KERNEL_MODULES), 10]: rank, scale (float32 bits), start of A's page ids,
        start of B^T's page ids, start of the DoRA scale's page ids or 0 (offsets within the block),
        output columns (out_features), replace (1: a full copy, its output replaces the base's),
        the first stored row of A in its first page, of B^T, of g
    page ids of every matrix, A then B^T (then g), module after module

``rank == 0`` means the adapter lacks that (layer, module). A step's blocks are concatenated; the
kernels find row ``j`` of a matrix at ``arena[page * page_elems + ((row0 + j) % rpp) * row_len]``
with ``page = block[start + (row0 + j) // rpp]`` and ``rpp = page_elems // row_len``, each adapter
at its own rank (rows of several matrices share pages: server/adapter_packing.py). (Re-sending
the blocks every step costs ~11 KB of header per SmolLM2 adapter, 30 layers x 9 modules x 10
words, plus its page ids; the alternative, a device-resident directory of blocks, would need its
own allocator.)

**Tiles** (section ``lora_tiles``). One work item per tile of an adapter's segment: ``(first row,
end of the segment, start of the adapter's block)``. A segment of at most ``DECODE_MAX`` tokens
(decode) is one short tile of ``short_m`` rows (1, 2 or 4: the step's longest short segment, rounded
up to a power of two), computed without ``tl.dot`` (BGMV-like: no 16-row tile mostly masked); a
longer one (prefill) is cut into 16-row tiles computed with ``tl.dot`` (SGMV). Both kinds share one
list, so a step makes one launch per kernel whatever its mix; a program tells its kind from its row
count. The list is padded to a power-of-two length with ``(0, 0, -1)`` items that exit at once, so
a kernel's grid takes few distinct shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.model_config import KERNEL_MODULES, MODEL_MODULES
from server.page_layout import AdapterPageTable

HDR_FIELDS = 10
DECODE_MAX = 4  # segments up to this many tokens use the decode-shaped kernels
SGMV_BLOCK_M = 16  # tl.dot needs at least 16 rows
_MODULE_INDEX = {m: i for i, m in enumerate(KERNEL_MODULES)}


@dataclass(frozen=True)
class AdapterBlock:
    data: np.ndarray  # int32, header then page ids
    max_rank: int
    model_modules: frozenset[str] = frozenset()  # the model-wide sites (embed_tokens, lm_head) it has


def adapter_block(table: AdapterPageTable, num_layers: int) -> AdapterBlock:
    """One adapter's header and page ids (see the module docstring)."""
    header = np.zeros((num_layers, len(KERNEL_MODULES), HDR_FIELDS), dtype=np.int32)
    pages: list[int] = []
    start = header.size
    for (layer, module), mat in table.modules.items():
        a_start = start + len(pages)
        pages += mat.a_pages
        b_start = start + len(pages)
        pages += mat.b_pages
        g_start = start + len(pages) if mat.dora else 0
        pages += mat.g_pages
        header[layer, _MODULE_INDEX[module]] = (mat.rank, np.float32(mat.scale).view(np.int32), a_start,
                                                b_start, g_start, mat.out_features, int(mat.replace),
                                                mat.a_row0, mat.b_row0, mat.g_row0)
    data = np.concatenate([header.reshape(-1), np.asarray(pages, dtype=np.int32)])
    return AdapterBlock(data, max((m.rank for m in table.modules.values()), default=0),
                        frozenset(m for _, m in table.modules if m in MODEL_MODULES))


@dataclass(frozen=True)
class Tiles:
    short_m: int  # rows of a short (decode-shaped) tile: 1, 2 or 4
    items: np.ndarray  # [n, 3] int32, n a power of two


def plan_tiles(seg_starts: Sequence[int], seg_slots: Sequence[int], slot_base: Sequence[int]) -> Tiles | None:
    """The step's work list (see the module docstring); None if no token has an adapter."""
    items: list[tuple[int, int, int]] = []
    longest_short = 1
    for s, slot in enumerate(seg_slots):
        start, end = seg_starts[s], seg_starts[s + 1]
        if slot < 0 or end == start:
            continue
        if end - start <= DECODE_MAX:
            longest_short = max(longest_short, end - start)
            items.append((start, end, slot_base[slot]))
        else:
            items += [(row, end, slot_base[slot]) for row in range(start, end, SGMV_BLOCK_M)]
    if not items:
        return None
    n = 1 << (len(items) - 1).bit_length()
    out = np.zeros((n, 3), dtype=np.int32)
    out[:, 2] = -1
    out[: len(items)] = items
    return Tiles(1 << (longest_short - 1).bit_length(), out)
