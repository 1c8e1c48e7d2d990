"""KV block tables over the unified pool. Plain Python; no torch.

A KV block is ``block_size`` tokens of one layer and takes one page, so growing a request by one
block takes ``num_layers`` pages (one per layer). Pages are allocated all-or-nothing per call.
A request's table may start with blocks shared from the prefix cache (read-only: a request only
ever writes at positions past its cached prefix); the rest are its own.
"""

from __future__ import annotations

from server.page_layout import PageLayout
from server.pool import PagePool
from server.prefix_cache import CachedBlock, NoPrefixCache, PrefixCache
from server.request import Request


class KVManager:
    def __init__(self, pool: PagePool, layout: PageLayout,
                 cache: PrefixCache | NoPrefixCache | None = None) -> None:
        self.pool = pool
        self.layout = layout
        self.cache = cache or NoPrefixCache()

    def pages_needed(self, req: Request, num_new_tokens: int) -> int:
        """Pages to add so that ``req`` can hold ``num_computed_tokens + num_new_tokens`` tokens."""
        total = req.num_computed_tokens + num_new_tokens
        blocks = self.layout.kv_blocks_for_tokens(total) - req.num_blocks
        return max(blocks, 0) * self.layout.num_layers

    def pages_for_tokens(self, num_tokens: int) -> int:
        return self.layout.kv_blocks_for_tokens(num_tokens) * self.layout.num_layers

    def attach_prefix(self, req: Request, blocks: list[CachedBlock]) -> None:
        """Start an empty request's table with cached ``blocks``: their tokens count as computed."""
        assert not req.block_table and req.num_computed_tokens == 0
        if not blocks:
            return
        self.cache.acquire(blocks)
        req.block_table = [[b.pages[layer] for b in blocks] for layer in range(self.layout.num_layers)]
        req.num_computed_tokens = len(blocks) * self.layout.block_size
        req.num_offered_blocks = len(blocks)

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
        """Let go of every block: cached ones go back to the cache (last block first, so a
        prefix's tail is evicted before its head), the request's own ones to the pool."""
        table = req.block_table
        own = [[] for _ in table]
        for b in reversed(range(req.num_blocks)):
            pages = [layer[b] for layer in table]
            if not self.cache.release(pages):
                for layer, page in enumerate(pages):
                    own[layer].append(page)
        for layer_pages in own:  # layer by layer, first block first: deterministic reuse order
            self.pool.free(layer_pages[::-1])
        req.block_table = []
        req.num_offered_blocks = 0
