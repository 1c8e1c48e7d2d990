"""How the unified pool's pages are cut: pure arithmetic, shared by bookkeeping and kernels.

The arena is one device tensor of shape ``[num_pages, page_elems]`` in the serving dtype. A page
holds either

* one KV block of one layer: ``block_size`` tokens of K and V, viewed as
  ``[2, block_size, num_kv_heads, head_dim]`` (K at index 0, V at index 1); or
* whole rows of one LoRA matrix of one (adapter, layer, module): ``A`` is stored as its ``r``
  rows of length ``in_features``; ``B`` is stored transposed, as ``r`` rows of length
  ``out_features``. A page holds ``page_elems // row_len`` rows; row ``j`` lives in page
  ``pages[j // rows_per_page]`` at element offset ``(j % rows_per_page) * row_len``.
  Two model-wide sites differ: embed_tokens' ``A`` is stored transposed (``in_features`` = vocab
  rows of ``r``: a token's shrink is a lookup of its row), and a DoRA module has one more matrix,
  its per-output scale ``g`` (one row of ``out_features``).

A row longer than a page (lm_head's ``B^T`` and ``g``: rows of vocab length) is cut into
page-long pieces: stored row ``c * rows + j`` holds columns ``c * page_elems ...`` of row ``j``
(piece-major), so a reader of columns ``n`` finds them in piece ``n // page_elems`` (``stored_shape``).

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

from server.model_config import ModelConfig


@dataclass(frozen=True)
class PageLayout:
    page_elems: int
    block_size: int  # tokens per KV page
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.page_elems != 2 * self.block_size * self.num_kv_heads * self.head_dim:
            raise ValueError("page_elems must equal 2 * block_size * num_kv_heads * head_dim")

    def rows_per_page(self, row_len: int) -> int:
        rpp = self.page_elems // row_len
        if rpp < 1:
            raise ValueError(f"a row of {row_len} elements does not fit a page of {self.page_elems}")
        return rpp

    def pages_for_rows(self, rows: int, row_len: int) -> int:
        rows, row_len = stored_shape(rows, row_len, self.page_elems)
        rpp = self.rows_per_page(row_len)
        return -(-rows // rpp)

    def kv_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @classmethod
    def for_model(cls, config: ModelConfig, block_size: int = 16) -> PageLayout:
        widest = max(max(i, o) for i, o in config.linear_shapes().values())
        while 2 * block_size * config.kv_size < widest:
            block_size *= 2
        return cls(
            page_elems=2 * block_size * config.kv_size,
            block_size=block_size,
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
        )


def stored_shape(rows: int, row_len: int, page_elems: int) -> tuple[int, int]:
    """``(rows, row length)`` of a ``[rows, row_len]`` matrix as stored in pages: itself, or, if a row
    is longer than a page, ``rows * pieces`` rows of ``page_elems`` (piece-major, zero-padded)."""
    if row_len <= page_elems:
        return rows, row_len
    return rows * -(-row_len // page_elems), page_elems


@dataclass(frozen=True)
class LoraMatrixPages:
    """Where one (adapter, layer, module)'s LoRA weights live in the arena."""

    rank: int
    scale: float  # lora_alpha / rank, or lora_alpha / sqrt(rank) for rsLoRA
    in_features: int
    out_features: int
    a_pages: tuple[int, ...]  # A: `rank` rows of `in_features` (A.T if `a_transposed`)
    b_pages: tuple[int, ...]  # B transposed: `rank` rows of `out_features`
    g_pages: tuple[int, ...] = ()  # DoRA: the scale g = m / ||W0 + s B A|| (one row); () for plain LoRA
    a_transposed: bool = False  # embed_tokens: A stored as `in_features` rows of `rank`
    replace: bool = False  # a full copy of the module (modules_to_save): its output replaces the base's

    @property
    def a_shape(self) -> tuple[int, int]:
        """``(rows, row length)`` of ``A`` as written (before cutting long rows)."""
        return (self.in_features, self.rank) if self.a_transposed else (self.rank, self.in_features)

    @property
    def dora(self) -> bool:
        return bool(self.g_pages)


@dataclass(frozen=True)
class AdapterPageTable:
    """All pages of one resident adapter. ``uid`` is unique per loaded adapter (never reused)."""

    uid: int
    modules: dict[tuple[int, str], LoraMatrixPages]  # (layer, module name) -> pages

    def all_pages(self) -> list[int]:
        return [p for m in self.modules.values() for p in (*m.a_pages, *m.b_pages, *m.g_pages)]
