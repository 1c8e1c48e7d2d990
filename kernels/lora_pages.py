"""Adapter matrices in the arena's pages: write rows in, gather rows out (layout: server/page_layout.py).

Rows longer than a page are cut into page-long pieces on the way in (``to_stored``) and joined on
the way out (``from_stored``); every function here takes and returns matrices as written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from server.page_layout import AdapterPageTable, LoraMatrixPages, stored_shape

if TYPE_CHECKING:
    from adapter_store.peft_format import LoraWeights

AdapterWeights = Mapping[tuple[int, str], "LoraWeights"]


def _page_index(pages: Sequence[int], num_rows: int, rpp: int, device: torch.device) -> torch.Tensor:
    need = -(-num_rows // rpp)
    if len(pages) < need:
        raise ValueError(f"{num_rows} rows at {rpp} rows/page need {need} pages, got {len(pages)}")
    return torch.tensor(list(pages[:need]), dtype=torch.long, device=device)


def to_stored(rows: torch.Tensor, page_elems: int) -> torch.Tensor:
    """``rows [r, n]`` as stored (``stored_shape``): itself, or its page-long pieces, piece-major."""
    r, n = rows.shape
    num, length = stored_shape(r, n, page_elems)
    if length == n:
        return rows
    pieces = num // r
    padded = rows.new_zeros(r, pieces * length)
    padded[:, :n] = rows
    return padded.view(r, pieces, length).transpose(0, 1).reshape(num, length)


def from_stored(stored: torch.Tensor, rows: int, row_len: int) -> torch.Tensor:
    """Inverse of ``to_stored``: ``[rows, row_len]`` from the stored rows."""
    if stored.shape[1] == row_len:
        return stored
    pieces = stored.shape[0] // rows
    return stored.view(pieces, rows, -1).transpose(0, 1).reshape(rows, -1)[:, :row_len]


def write_matrix_rows(arena: torch.Tensor, pages: Sequence[int], rows: torch.Tensor) -> None:
    """Copy ``rows [r, row_len]`` into ``arena [num_pages, page_elems]`` at ``pages``.

    Row ``j`` goes to page ``pages[j // rpp]`` at element offset ``(j % rpp) * row_len`` with
    ``rpp = page_elems // row_len``; rows are cast to the arena's dtype and device. Store ``A`` as
    its ``r`` rows and ``B`` as ``B.T`` (``r`` rows of ``out_features``). The unused tail of the last
    page is zeroed: pages belong to one matrix. Rows longer than a page are cut (``to_stored``).
    """
    rows = to_stored(rows, arena.shape[1])
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
    stored_rows, stored_len = stored_shape(num_rows, row_len, arena.shape[1])
    rpp = arena.shape[1] // stored_len
    idx = _page_index(pages, stored_rows, rpp, arena.device)
    stored = arena[idx, : rpp * stored_len].reshape(-1, stored_len)[:stored_rows]
    return from_stored(stored, num_rows, row_len).contiguous()


def read_lora_weights(arena: torch.Tensor, mat: LoraMatrixPages) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in_features], B^T [r, out_features])`` of one module, copied out of the pages.

    For a transposed ``A`` (embed_tokens) the first is a transposed view of the stored ``A.T``."""
    a = read_matrix_rows(arena, mat.a_pages, *mat.a_shape)
    bt = read_matrix_rows(arena, mat.b_pages, mat.rank, mat.out_features)
    return (a.t() if mat.a_transposed else a), bt


def read_dora_scale(arena: torch.Tensor, mat: LoraMatrixPages) -> torch.Tensor | None:
    """DoRA's per-output scale ``g [out_features]`` of one module, or None for plain LoRA."""
    if not mat.dora:
        return None
    return read_matrix_rows(arena, mat.g_pages, 1, mat.out_features)[0]


def adapter_matrices(table: AdapterPageTable,
                     weights: AdapterWeights) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """``(rows, pages)`` of every matrix of an adapter: ``A [r, in]`` as is (``A.T`` for a transposed
    ``A``), ``B`` as ``B.T [r, out]``, and a DoRA module's scale as one row ``g [1, out]``."""
    out = []
    for key, mat in table.modules.items():
        w = weights[key]
        out += [(w.a.t() if mat.a_transposed else w.a, mat.a_pages), (w.b.t(), mat.b_pages)]
        if mat.dora:
            if w.dora_scale is None:
                raise ValueError(f"module {key} is placed as DoRA but its weights have no DoRA scale")
            out.append((w.dora_scale.view(1, -1), mat.g_pages))
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
        rows = to_stored(rows, page_elems)
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
