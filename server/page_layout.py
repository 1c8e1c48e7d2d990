"""How the unified pool's pages are cut: pure arithmetic, shared by bookkeeping and kernels.

The arena is one device buffer of ``num_pages`` pages of ``page_bytes`` bytes. A page holds either

* one KV block of one layer, in the model's dtype: ``block_size`` tokens of K and V, viewed as
  ``[2, block_size, num_kv_heads, head_dim]`` (K at index 0, V at index 1); or
* rows of one adapter's LoRA matrices, in that adapter's storage dtype (the model's, or bf16 for an
  adapter whose weights are bf16: half the bytes for every step to read): ``A`` is stored as its
  ``r`` rows of length ``in_features``; ``B`` is stored transposed, as ``r`` rows of length
  ``out_features``. A page holds ``rows_per_page = elems_per_page(itemsize) // row_len`` rows.
  The rows of one adapter's matrices of equal row length form one stream across its pages, layer
  after layer (server/adapter_packing.py): a matrix is its stream's rows ``first .. first + r``,
  so small ranks share pages instead of each taking a mostly empty one. ``LoraMatrixPages`` says
  where: row ``j`` lives in page ``pages[(row0 + j) // rows_per_page]`` at element offset
  ``((row0 + j) % rows_per_page) * row_len``.
  Two model-wide sites differ: embed_tokens' ``A`` is stored transposed (``in_features`` = vocab
  rows of ``r``: a token's shrink is a lookup of its row), and a DoRA module has one more matrix,
  its per-output scale ``g`` (one row of ``out_features``).

A row longer than a page (lm_head's ``B^T`` and ``g``: rows of vocab length) is cut into
page-long pieces of ``E = elems_per_page(itemsize)`` elements: stored row ``c * rows + j`` holds
columns ``c * E ...`` of row ``j`` (piece-major), so a reader of columns ``n`` finds them in piece
``n // E`` (``stored_shape``). Pieces are rows of ``E``: one to a page.

Why this page size: under grouped-query attention one token's K vector (``kv_heads * head_dim``,
192 for SmolLM2) is far narrower than the hidden size (576), so sizing pages as "one token"
(S-LoRA) wastes space or cannot hold a hidden-size row. Sizing a page as one KV block of one
layer (``2 * block_size * kv_size`` elements; 6144 for SmolLM2 with 16-token blocks) makes KV
pages exact and holds 10 hidden rows or 4 intermediate rows, so adapter pages are nearly full and
scale linearly with rank. ``block_size`` grows (by powers of two) only if a page could not hold
one row of the widest LoRA matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from server.model_config import ModelConfig


@dataclass(frozen=True)
class PageLayout:
    page_elems: int  # a page in elements of the model dtype (one KV block)
    block_size: int  # tokens per KV page
    num_layers: int
    num_kv_heads: int
    head_dim: int
    itemsize: int = 4  # bytes per element of the model dtype

    def __post_init__(self) -> None:
        if self.page_elems != 2 * self.block_size * self.num_kv_heads * self.head_dim:
            raise ValueError("page_elems must equal 2 * block_size * num_kv_heads * head_dim")

    @property
    def page_bytes(self) -> int:
        return self.page_elems * self.itemsize

    def elems_per_page(self, itemsize: int | None = None) -> int:
        """Elements of a dtype of ``itemsize`` bytes (default: the model's) in one page."""
        return self.page_bytes // (itemsize or self.itemsize)

    def rows_per_page(self, row_len: int, itemsize: int | None = None) -> int:
        rpp = self.elems_per_page(itemsize) // row_len
        if rpp < 1:
            raise ValueError(f"a row of {row_len} elements does not fit a page of "
                             f"{self.elems_per_page(itemsize)}")
        return rpp

    def pages_for_rows(self, rows: int, row_len: int, itemsize: int | None = None) -> int:
        rows, row_len = stored_shape(rows, row_len, self.elems_per_page(itemsize))
        rpp = self.rows_per_page(row_len, itemsize)
        return -(-rows // rpp)

    def kv_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @classmethod
    def for_model(cls, config: ModelConfig, block_size: int = 16, itemsize: int = 4) -> PageLayout:
        widest = max(max(i, o) for i, o in config.linear_shapes().values())
        while 2 * block_size * config.kv_size < widest:
            block_size *= 2
        return cls(
            page_elems=2 * block_size * config.kv_size,
            block_size=block_size,
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            itemsize=itemsize,
        )


def stored_shape(rows: int, row_len: int, page_elems: int) -> tuple[int, int]:
    """``(rows, row length)`` of a ``[rows, row_len]`` matrix as stored in pages: itself, or, if a row
    is longer than a page, ``rows * pieces`` rows of ``page_elems`` (piece-major, zero-padded)."""
    if row_len <= page_elems:
        return rows, row_len
    return rows * -(-row_len // page_elems), page_elems


@dataclass(frozen=True)
class LoraMatrixPages:
    """Where one (adapter, layer, module)'s LoRA weights live in the arena: ``A`` as ``rank`` rows
    of ``in_features`` starting at row ``a_row0`` of page ``a_pages[0]``, ``B^T`` and DoRA's ``g``
    likewise (rows as stored: ``stored_shape``). Pages may be shared with the adapter's other
    matrices (never with another adapter); a matrix's pages are listed once each, in order."""

    rank: int
    scale: float  # lora_alpha / rank, or lora_alpha / sqrt(rank) for rsLoRA
    in_features: int
    out_features: int
    a_pages: tuple[int, ...]  # A: `rank` rows of `in_features` (A.T if `a_transposed`)
    b_pages: tuple[int, ...]  # B transposed: `rank` rows of `out_features`
    g_pages: tuple[int, ...] = ()  # DoRA: the scale g = m / ||W0 + s B A|| (one row); () for plain LoRA
    a_transposed: bool = False  # embed_tokens: A stored as `in_features` rows of `rank`
    replace: bool = False  # a full copy of the module (modules_to_save): its output replaces the base's
    a_row0: int = 0  # the first stored row of A within a_pages[0]
    b_row0: int = 0
    g_row0: int = 0

    @property
    def a_shape(self) -> tuple[int, int]:
        """``(rows, row length)`` of ``A`` as written (before cutting long rows)."""
        return (self.in_features, self.rank) if self.a_transposed else (self.rank, self.in_features)

    @property
    def dora(self) -> bool:
        return bool(self.g_pages)

    @property
    def streamed_elems(self) -> int:
        """Elements a step that uses the module reads whole: ``A`` (not an embedding's ``A.T``: a
        token looks up its row), ``B^T`` and DoRA's ``g``."""
        a = 0 if self.a_transposed else self.rank * self.in_features
        return a + self.rank * self.out_features + (self.out_features if self.dora else 0)


# Storage dtypes of adapter pages, by name (pure Python: no torch here), and their sizes.
STORAGE_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class AdapterPageTable:
    """All pages of one resident adapter. ``uid`` is unique per loaded adapter (never reused).

    ``dtype``: the storage dtype of its rows (None: the model's); ``pages``: every page it holds,
    each once (None: the matrices' own pages, as a table built by hand lists them)."""

    uid: int
    modules: dict[tuple[int, str], LoraMatrixPages]  # (layer, module name) -> pages
    dtype: str | None = None
    pages: tuple[int, ...] | None = None

    def all_pages(self) -> list[int]:
        if self.pages is not None:
            return list(self.pages)
        mats = self.modules.values()
        return list(dict.fromkeys(p for m in mats for p in (*m.a_pages, *m.b_pages, *m.g_pages)))

    @cached_property
    def weight_elems(self) -> int:
        """Elements of its rows a step that uses every module streams (``streamed_elems``)."""
        return sum(m.streamed_elems for m in self.modules.values())

    def weight_bytes(self, model_itemsize: int) -> int:
        return self.weight_elems * (STORAGE_ITEMSIZE[self.dtype] if self.dtype else model_itemsize)
