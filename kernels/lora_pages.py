"""Adapter matrices in the arena's pages: write rows in, gather rows out (layout: server/page_layout.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from server.page_layout import AdapterPageTable, LoraMatrixPages

if TYPE_CHECKING:
    from adapter_store.peft_format import LoraWeights

AdapterWeights = Mapping[tuple[int, str], "LoraWeights"]


def _page_index(pages: Sequence[int], num_rows: int, rpp: int, device: torch.device) -> torch.Tensor:
    need = -(-num_rows // rpp)
    if len(pages) < need:
        raise ValueError(f"{num_rows} rows at {rpp} rows/page need {need} pages, got {len(pages)}")
    return torch.tensor(list(pages[:need]), dtype=torch.long, device=device)


def write_matrix_rows(arena: torch.Tensor, pages: Sequence[int], rows: torch.Tensor) -> None:
    """Copy ``rows [r, row_len]`` into ``arena [num_pages, page_elems]`` at ``pages``.

    Row ``j`` goes to page ``pages[j // rpp]`` at element offset ``(j % rpp) * row_len`` with
    ``rpp = page_elems // row_len``; rows are cast to the arena's dtype and device. Store ``A`` as
    its ``r`` rows and ``B`` as ``B.T`` (``r`` rows of ``out_features``). The unused tail of the last
    page is zeroed: pages belong to one matrix.
    """
    num_rows, row_len = rows.shape
    rpp = arena.shape[1] // row_len
    if rpp < 1:
        raise ValueError(f"a row of {row_len} elements does not fit a page of {arena.shape[1]}")
    idx = _page_index(pages, num_rows, rpp, arena.device)
    padded = torch.zeros(len(idx) * rpp, row_len, dtype=arena.dtype, device=arena.device)
    padded[:num_rows] = rows
    arena[idx, : rpp * row_len] = padded.view(len(idx), rpp * row_len)


def read_matrix_rows(arena: torch.Tensor, pages: Sequence[int], num_rows: int, row_len: int) -> torch.Tensor:
    """Gather ``num_rows`` rows of ``row_len`` from ``pages`` into a new contiguous tensor."""
    rpp = arena.shape[1] // row_len
    idx = _page_index(pages, num_rows, rpp, arena.device)
    return arena[idx, : rpp * row_len].reshape(-1, row_len)[:num_rows]


def read_lora_weights(arena: torch.Tensor, mat: LoraMatrixPages) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in_features], B^T [r, out_features])`` of one module, copied out of the pages."""
    a = read_matrix_rows(arena, mat.a_pages, mat.rank, mat.in_features)
    bt = read_matrix_rows(arena, mat.b_pages, mat.rank, mat.out_features)
    return a, bt


def adapter_matrices(table: AdapterPageTable,
                     weights: AdapterWeights) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """``(rows, pages)`` of every matrix of an adapter: ``A [r, in]`` as is, ``B`` as ``B.T [r, out]``."""
    out = []
    for key, mat in table.modules.items():
        w = weights[key]
        out += [(w.a, mat.a_pages), (w.b.t(), mat.b_pages)]
    return out


def pack_pages(matrices: Sequence[tuple[torch.Tensor, tuple[int, ...]]], page_elems: int,
               out: torch.Tensor) -> list[int]:
    """Lay matrices' rows out as the contents of their pages, in ``out [n_pages, page_elems]``.

    Returns the page ids in order: ``out[i]`` is what page ``ids[i]`` must hold (rows as in
    ``write_matrix_rows``; the unused tail of a page is left as ``out`` had it). Two copies per
    matrix, whatever its rank: full pages as one block, then the last partial page.
    """
    ids: list[int] = []
    for rows, pages in matrices:
        num_rows, row_len = rows.shape
        rpp = page_elems // row_len
        need = -(-num_rows // rpp)
        if rpp < 1 or len(pages) < need:
            raise ValueError(f"{num_rows} rows of {row_len} do not fit {len(pages)} pages of {page_elems}")
        first = len(ids)
        ids += pages[:need]
        dst = out[first : first + need, : rpp * row_len].view(need, rpp, row_len)
        full = num_rows // rpp
        if full:
            dst[:full] = rows[: full * rpp].reshape(full, rpp, row_len)
        if num_rows > full * rpp:
            dst[full, : num_rows - full * rpp] = rows[full * rpp :]
    return ids
