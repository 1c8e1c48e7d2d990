"""Adapter matrices in the arena's pages: write rows in, gather rows out (layout: server/page_layout.py).

The arena is typed in the model dtype; an adapter whose pages hold another storage dtype (bf16 rows
in an fp32 model) is read and written through ``storage_view``: the same bytes as
``[num_pages, page_bytes // itemsize]`` elements of that dtype.

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
# (rows [r, row_len] as written, pages holding them, index of stored row 0 within pages[0])
Matrix = tuple[torch.Tensor, tuple[int, ...], int]


def storage_dtype(arena: torch.Tensor, dtype: str | None) -> torch.dtype:
    return arena.dtype if dtype is None else getattr(torch, dtype)


def storage_view(arena: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """The arena's pages as elements of an adapter's storage ``dtype`` (None: the arena's own)."""
    want = storage_dtype(arena, dtype)
    if want == arena.dtype:
        return arena
    return arena.view(torch.uint8).view(want)


def _page_index(pages: Sequence[int], row0: int, num_rows: int, rpp: int,
                device: torch.device) -> torch.Tensor:
    need = -(-(row0 + num_rows) // rpp)
    if len(pages) < need or not 0 <= row0 < max(rpp, 1):
        raise ValueError(f"{num_rows} rows from row {row0} at {rpp} rows/page need {need} pages, "
                         f"got {len(pages)}")
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
    return stored.reshape(pieces, rows, -1).transpose(0, 1).reshape(rows, -1)[:, :row_len]


def _rpp(arena: torch.Tensor, row_len: int) -> int:
    rpp = arena.shape[1] // row_len
    if rpp < 1:
        raise ValueError(f"a row of {row_len} elements does not fit a page of {arena.shape[1]}")
    return rpp


def write_matrix_rows(arena: torch.Tensor, pages: Sequence[int], rows: torch.Tensor, row0: int = 0) -> None:
    """Copy ``rows [r, row_len]`` into ``arena [num_pages, elems]`` (a storage view) at ``pages``.

    Row ``j`` goes to page ``pages[(row0 + j) // rpp]`` at element offset ``((row0 + j) % rpp) *
    row_len`` with ``rpp = elems // row_len``; rows are cast to the arena's dtype. Other rows of the
    pages (another matrix of the same adapter) are left as they are. Store ``A`` as its ``r`` rows
    and ``B`` as ``B.T`` (``r`` rows of ``out_features``). Rows longer than a page are cut first
    (``to_stored``; ``row0`` then counts stored rows).
    """
    rows = to_stored(rows, arena.shape[1])
    num_rows, row_len = rows.shape
    rpp = _rpp(arena, row_len)
    idx = _page_index(pages, row0, num_rows, rpp, arena.device)
    block = arena[idx, : rpp * row_len].reshape(-1, row_len)
    block[row0 : row0 + num_rows] = rows
    arena[idx, : rpp * row_len] = block.view(len(idx), rpp * row_len)


def read_matrix_rows(arena: torch.Tensor, pages: Sequence[int], num_rows: int, row_len: int,
                     row0: int = 0) -> torch.Tensor:
    """Gather ``num_rows`` rows of ``row_len`` from ``pages`` (from stored row ``row0``) into a new
    contiguous tensor."""
    stored_rows, stored_len = stored_shape(num_rows, row_len, arena.shape[1])
    rpp = _rpp(arena, stored_len)
    idx = _page_index(pages, row0, stored_rows, rpp, arena.device)
    stored = arena[idx, : rpp * stored_len].reshape(-1, stored_len)[row0 : row0 + stored_rows]
    return from_stored(stored, num_rows, row_len).contiguous()


def read_lora_weights(arena: torch.Tensor, mat: LoraMatrixPages,
                      dtype: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in_features], B^T [r, out_features])`` of one module, copied out of the pages, in
    the adapter's storage ``dtype``. For a transposed ``A`` (embed_tokens) the first is a transposed
    view of the stored ``A.T``."""
    view = storage_view(arena, dtype)
    a = read_matrix_rows(view, mat.a_pages, *mat.a_shape, mat.a_row0)
    bt = read_matrix_rows(view, mat.b_pages, mat.rank, mat.out_features, mat.b_row0)
    return (a.t() if mat.a_transposed else a), bt


def read_dora_scale(arena: torch.Tensor, mat: LoraMatrixPages,
                    dtype: str | None = None) -> torch.Tensor | None:
    """DoRA's per-output scale ``g [out_features]`` of one module (in the adapter's storage
    ``dtype``), or None for plain LoRA."""
    if not mat.dora:
        return None
    return read_matrix_rows(storage_view(arena, dtype), mat.g_pages, 1, mat.out_features, mat.g_row0)[0]


def adapter_matrices(table: AdapterPageTable, weights: AdapterWeights) -> list[Matrix]:
    """``(rows, pages, row0)`` of every matrix of an adapter: ``A [r, in]`` as is (``A.T`` for a
    transposed ``A``), ``B`` as ``B.T [r, out]``, and a DoRA module's scale as one row ``g [1, out]``."""
    out = []
    for key, mat in table.modules.items():
        w = weights[key]
        out += [(w.a.t() if mat.a_transposed else w.a, mat.a_pages, mat.a_row0),
                (w.b.t(), mat.b_pages, mat.b_row0)]
        if mat.dora:
            if w.dora_scale is None:
                raise ValueError(f"module {key} is placed as DoRA but its weights have no DoRA scale")
            out.append((w.dora_scale.view(1, -1), mat.g_pages, mat.g_row0))
    return out


def _write_span(dst: torch.Tensor, row0: int, rows: torch.Tensor) -> None:
    """``rows`` into ``dst [pages, rpp, row_len]`` from flat row ``row0`` on: at most three copies
    (the rest of the first page, whole pages, the start of the last)."""
    rpp = dst.shape[1]
    n, done = rows.shape[0], 0
    if row0 % rpp:
        take = min(rpp - row0 % rpp, n)
        dst[row0 // rpp, row0 % rpp : row0 % rpp + take] = rows[:take]
        done = take
    page = -(-row0 // rpp) if row0 % rpp else row0 // rpp
    full = (n - done) // rpp
    if full:
        dst[page : page + full] = rows[done : done + full * rpp].reshape(full, rpp, -1)
        done += full * rpp
    if done < n:
        dst[page + full, : n - done] = rows[done:]


def pack_pages(matrices: Sequence[Matrix], elems: int, out: torch.Tensor, order: Sequence[int]) -> None:
    """Lay matrices' rows out as the contents of their pages: ``out[i]`` (``[n_pages, elems]``, zeroed
    by the caller) is what page ``order[i]`` must hold. Each matrix's pages must be consecutive in
    ``order`` (an adapter's page table lists them so); a few tensor copies per matrix. Rows longer
    than a page are cut (``to_stored``)."""
    position = {p: i for i, p in enumerate(order)}
    for rows, pages, row0 in matrices:
        rows = to_stored(rows, elems)
        num_rows, row_len = rows.shape
        rpp = elems // row_len
        need = -(-(row0 + num_rows) // rpp)
        if rpp < 1 or len(pages) < need:
            raise ValueError(f"{num_rows} rows of {row_len} do not fit {len(pages)} pages of {elems}")
        first = position[pages[0]]
        if [position[p] for p in pages[:need]] != list(range(first, first + need)):
            raise ValueError("a matrix's pages must be consecutive in the page order")
        _write_span(out[first : first + need, : rpp * row_len].view(need, rpp, row_len), row0, rows)
