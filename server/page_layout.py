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


@dataclass(frozen=True)
class LoraMatrixPages:
    """Where one (adapter, layer, module)'s LoRA weights live in the arena: ``A`` as ``rank`` rows
    of ``in_features`` starting at row ``a_row0`` of page ``a_pages[0]``, ``B^T`` likewise. Pages
    may be shared with the adapter's other matrices (never with another adapter)."""

    rank: int
    scale: float  # lora_alpha / rank, or lora_alpha / sqrt(rank) for rsLoRA
    in_features: int
    out_features: int
    a_pages: tuple[int, ...]  # A: `rank` rows of `in_features`
    b_pages: tuple[int, ...]  # B transposed: `rank` rows of `out_features`
    a_row0: int = 0
    b_row0: int = 0


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
        return list(dict.fromkeys(p for m in self.modules.values() for p in (*m.a_pages, *m.b_pages)))

    @cached_property
    def weight_elems(self) -> int:
        """Elements of A and B^T rows: what a step that uses every module reads."""
        return sum(m.rank * (m.in_features + m.out_features) for m in self.modules.values())

    def weight_bytes(self, model_itemsize: int) -> int:
        return self.weight_elems * (STORAGE_ITEMSIZE[self.dtype] if self.dtype else model_itemsize)
