"""Rank-proportional adapter pages: an adapter's LoRA rows packed into its pages by row length. No torch.

Why: with a page per (layer, module, A or B^T) matrix, small ranks waste most of a page. On SmolLM2
(30 layers, 6,144-element pages) q,k,v,o adapters of rank 1, 4 and 8 all took 240 pages, of which
8%, 31% and 62% held weights. Here the rows of an adapter's matrices of equal row length form one
*stream* (on SmolLM2: hidden-size rows, i.e. A of every module but down and B^T of q, o and down;
KV-width rows, B^T of k and v; intermediate-size rows, A of down and B^T of gate and up), one
matrix after another, layer after layer, ``rows_per_page`` rows to a page. A page then wastes at
most its tail (less than one row) and a stream at most its last page's unused rows: on SmolLM2 at
least 93% of an adapter's page bytes hold weights for any rank in fp32, 96% in bf16 from rank 4.

Every matrix is placed as stored (``stored_shape``): an embedding's ``A.T`` (vocab rows of
``rank``) joins the stream of rank-long rows, a DoRA scale ``g`` (one row) the stream of its
module's output width, and a row longer than a page (lm_head's ``B^T`` and ``g``) becomes
page-long pieces, a stream of one row per page.

The layout, exact (the tests pin page ids): streams in descending row length; within a stream,
matrices in (layer, module) order (a layer's modules in ``KERNEL_MODULES`` order, so the model-wide
sites keyed at ``MODEL_LAYER`` come after layer 0's linear modules), each module's ``A`` before its
``B^T`` before its ``g``; the adapter's pages are taken stream after stream, in the order the pool
hands them out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from server.model_config import KERNEL_MODULES
from server.page_layout import AdapterPageTable, LoraMatrixPages, PageLayout, stored_shape

Key = tuple[int, str]  # (layer, module name)
_MODULE_ORDER = {m: i for i, m in enumerate(KERNEL_MODULES)}


def _order(key: Key) -> tuple[int, int, str]:
    """(layer, module in KERNEL_MODULES order): q, k, v, o, gate, up, down, embed_tokens, lm_head."""
    return key[0], _MODULE_ORDER.get(key[1], len(_MODULE_ORDER)), key[1]


class MatrixShape(Protocol):
    rank: int
    scale: float
    in_features: int
    out_features: int
    a_transposed: bool
    replace: bool

    @property
    def matrices(self) -> tuple[tuple[int, int], ...]: ...  # (rows, row length): A, B^T[, g]


@dataclass(frozen=True)
class Stream:
    row_len: int
    rows_per_page: int
    num_rows: int

    @property
    def num_pages(self) -> int:
        return -(-self.num_rows // self.rows_per_page)


@dataclass(frozen=True)
class RowSpan:
    """A matrix's stored rows within its stream: ``first .. first + count``."""

    stream: int
    first: int
    count: int


@dataclass(frozen=True)
class AdapterPacking:
    """Where every row of an adapter goes, before its pages are known."""

    streams: tuple[Stream, ...]
    spans: dict[Key, tuple[RowSpan, ...]]  # A, B^T and, for DoRA, g

    @property
    def num_pages(self) -> int:
        return sum(s.num_pages for s in self.streams)

    def place(self, uid: int, modules: Mapping[Key, MatrixShape], pages: Sequence[int],
              dtype: str | None = None) -> AdapterPageTable:
        """The page table once the pool gave the adapter ``pages`` (``num_pages`` of them)."""
        if len(pages) != self.num_pages:
            raise ValueError(f"the packing needs {self.num_pages} pages, got {len(pages)}")
        stream_pages, start = [], 0
        for s in self.streams:
            stream_pages.append(tuple(pages[start : start + s.num_pages]))
            start += s.num_pages

        def locate(span: RowSpan) -> tuple[tuple[int, ...], int]:
            rpp = self.streams[span.stream].rows_per_page
            first_page, last_page = span.first // rpp, (span.first + max(span.count, 1) - 1) // rpp
            return stream_pages[span.stream][first_page : last_page + 1], span.first % rpp

        out = {}
        for key in sorted(self.spans, key=_order):
            m = modules[key]
            (a_pages, a_row0), (b_pages, b_row0), *g = (locate(span) for span in self.spans[key])
            g_pages, g_row0 = g[0] if g else ((), 0)
            out[key] = LoraMatrixPages(m.rank, m.scale, m.in_features, m.out_features, a_pages, b_pages,
                                       g_pages, m.a_transposed, m.replace, a_row0, b_row0, g_row0)
        return AdapterPageTable(uid, out, dtype=dtype, pages=tuple(pages))


def pack(modules: Mapping[Key, MatrixShape], layout: PageLayout,
         itemsize: int | None = None) -> AdapterPacking:
    """The packing of an adapter with ``modules`` into pages, rows of ``itemsize`` bytes (default:
    the model dtype's)."""
    elems = layout.elems_per_page(itemsize)
    rows: dict[int, int] = {}  # stored row length -> rows so far
    spans: dict[Key, list[tuple[int, int, int]]] = {}  # (row length, first, count) per matrix
    for key in sorted(modules, key=_order):
        spans[key] = []
        for num_rows, row_len in modules[key].matrices:
            count, length = stored_shape(num_rows, row_len, elems)
            spans[key].append((length, rows.get(length, 0), count))
            rows[length] = rows.get(length, 0) + count
    lengths = sorted(rows, reverse=True)
    index = {n: i for i, n in enumerate(lengths)}
    streams = tuple(Stream(n, layout.rows_per_page(n, itemsize), rows[n]) for n in lengths)
    return AdapterPacking(streams, {key: tuple(RowSpan(index[n], first, count) for n, first, count in per)
                                    for key, per in spans.items()})


def fill_ratio(packing: AdapterPacking, layout: PageLayout, itemsize: int | None = None) -> float:
    """The fraction of the adapter's page bytes that its stored rows fill."""
    used = sum(s.num_rows * s.row_len for s in packing.streams)
    return used / (packing.num_pages * layout.elems_per_page(itemsize)) if packing.num_pages else 1.0
