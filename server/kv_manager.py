"""KV block tables over the unified pool. Plain Python; no torch.

A KV block is ``block_size`` tokens of one layer and takes one page, so growing a request by one
block takes ``num_layers`` pages (one per layer). Pages are allocated all-or-nothing per call.
"""

from __future__ import annotations

from server.page_layout import PageLayout
from server.pool import PagePool
from server.request import Request


class KVManager:
    def __init__(self, pool: PagePool, layout: PageLayout) -> None:
        self.pool = pool
        self.layout = layout

    def pages_needed(self, req: Request, num_new_tokens: int) -> int:
        """Pages to add so that ``req`` can hold ``num_computed_tokens + num_new_tokens`` tokens."""
        total = req.num_computed_tokens + num_new_tokens
        blocks = self.layout.kv_blocks_for_tokens(total) - req.num_blocks
        return max(blocks, 0) * self.layout.num_layers

    def pages_for_tokens(self, num_tokens: int) -> int:
        return self.layout.kv_blocks_for_tokens(num_tokens) * self.layout.num_layers

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        """Grow the block table to cover the new tokens. Raises OutOfPages, changing nothing."""
        n = self.pages_needed(req, num_new_tokens)
        if n == 0:
            return
        pages = self.pool.allocate(n, "kv")
        layers = self.layout.num_layers
        if not req.block_table:
            req.block_table = [[] for _ in range(layers)]
        # Pages come in block-major order: block0 for layers 0..L-1, then block1, ...
        for i, page in enumerate(pages):
            req.block_table[i % layers].append(page)

    def free(self, req: Request) -> None:
        for layer_pages in req.block_table:
            self.pool.free(layer_pages)
        req.block_table = []
