"""Where each stored row of an adapter's matrices lies in the arena, and the copy of the rows there
in one C call (kernels/adapter_copy.c ``scatter_rows``).

Why: a q,k,v,o adapter has 240 matrices. Their rows' offsets, made per run of rows in Python, and
their casts, transposes and copies, made per matrix in torch, were ~13 ms of the engine thread per
adapter loaded; here the offsets are one vectorized computation over all rows and the copy (with
B's transpose and the cast to the pages' dtype) one call.

The reference is ``write_matrix_rows`` (kernels/lora_pages.py): stored row ``j`` of a matrix placed
from row ``row0`` of ``pages``, ``rpp = elems // row_len`` rows to a page, lies at element
``pages[(row0 + j) // rpp] * elems + ((row0 + j) % rpp) * row_len`` of the arena.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kernels.lora_pages import Matrix, to_stored
from kernels.native_lib import library

# (pages, row0, stored rows, stored row length): one matrix's place (server/page_layout.py)
Placement = tuple[tuple[int, ...], int, int, int]
_CODES = {torch.float32: 0, torch.bfloat16: 1}  # kernels/adapter_copy.c dtype codes


def row_offsets(placements: Sequence[Placement], elems: int, item: int,
                num_pages: int | None = None) -> torch.Tensor:
    """Byte offset in the arena (pages of ``elems`` elements of ``item`` bytes) of every stored row,
    matrix after matrix, as int64. Raises ValueError if a matrix's rows do not fit its pages, or (given
    ``num_pages``) if a row lies on a page outside the arena."""
    pages: list[int] = []
    meta: list[int] = []  # per matrix: index of its first page in ``pages``, row0, rows, row length, rpp
    total = 0
    for mat_pages, row0, rows, row_len in placements:
        rpp = elems // row_len if row_len else 0
        if rpp < 1 or len(mat_pages) * rpp < row0 + rows:
            raise ValueError(f"{rows} rows of {row_len} do not fit {len(mat_pages)} pages of {elems}")
        meta += (len(pages), row0, rows, row_len, rpp)
        pages += mat_pages
        total += rows
    out = torch.empty(total, dtype=torch.int64)
    if total:
        m, p = torch.tensor(meta, dtype=torch.int64), torch.tensor(pages, dtype=torch.int64)
        if _lib().row_offsets(len(meta) // 5, m.data_ptr(), p.data_ptr(), elems, item,
                              -1 if num_pages is None else num_pages, out.data_ptr()):
            raise ValueError("a matrix's pages lie outside the arena")
    return out


def _lib() -> Any:
    lib = library()
    assert lib is not None, "kernels/page_rows.py used without the C kernels"
    return lib


def write_adapter_rows(arena: torch.Tensor, matrices: Sequence[Matrix]) -> None:
    """Copy each ``rows [r, row_len]`` into ``arena`` (a storage view ``[num_pages, elems]``, float32
    or bfloat16) at its pages from its ``row0``; rows longer than a page are cut first (``to_stored``).

    Same result as ``write_matrix_rows`` per matrix: rows cast to the arena's dtype (bf16: rounded to
    nearest even, as torch casts), any strides (``B.t()`` is read by column, not copied first). Unused
    page tails are left as they are: no reader looks past a matrix's rows.
    """
    lib = _lib()
    if arena.device.type != "cpu" or not arena.is_contiguous() or arena.dtype not in _CODES:
        raise ValueError("the arena must be a contiguous float32 or bfloat16 CPU tensor [num_pages, elems]")
    elems = arena.shape[1]
    keep, places, desc = [], [], []
    first = 0
    for rows, pages, row0 in matrices:
        src = to_stored(rows, elems)
        if src.dtype not in _CODES or src.device.type != "cpu":
            src = src.to("cpu", arena.dtype)
        n, row_len = src.shape
        keep.append(src)
        places.append((pages, row0, n, row_len))
        desc += (src.data_ptr(), _CODES[src.dtype], src.stride(0), src.stride(1), n, row_len, first)
        first += n
    offsets = row_offsets(places, elems, arena.element_size(), arena.shape[0])
    if desc:
        mats = torch.tensor(desc, dtype=torch.int64)
        lib.scatter_rows(arena.data_ptr(), _CODES[arena.dtype], len(keep), mats.data_ptr(),
                         offsets.data_ptr())
