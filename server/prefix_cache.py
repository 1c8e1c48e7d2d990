"""Automatic prefix caching over the unified pool, keyed by adapter version. Plain Python; no torch.

A full KV block (``block_size`` tokens; one page per layer) is named by a hash chain, as in vLLM
v1: ``hash(parent block's hash, adapter uid, the block's tokens)``. The parent makes the name
stand for the whole prefix up to the block's end (K/V at a position depend on every token before
it); the adapter uid is there because the same tokens give different K/V under different
adapters, and because the registry gives every add or replace a new uid, an adapter replaced under
the same name never reuses its old version's KV (vLLM #42495). Base-model requests use uid 0. The
hash is SHA-256 (vLLM's default since builtin ``hash`` chains were shown collidable on purpose):
a collision would hand one request another's KV.

A new request takes the longest chain of cached blocks that matches its tokens, reads them
shared (their pages get one more reference) and computes the rest; the block holding its last
token is never taken, because that token's logits are needed. Its own blocks are registered as
soon as a step is scheduled to fill them: the step writes every chunk's K/V before any attention
reads them, so a request admitted in the same step can already read them. A block whose tokens
are cached already (two requests with the same prompt in one step) stays the request's own.

The cache holds one reference on each cached block's pages. When the last request reading a
block lets go, the block is *parked*: evictable, with its pages counted free (``server/pool.py``)
and reclaimed in one order with idle adapters (``server/evictor.py``). A retired adapter uid
(deleted or replaced) has its blocks dropped at once.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from server.page_layout import PageLayout
from server.pool import PagePool
from server.request import Request

BASE_UID = 0  # registry uids start at 1


def hash_block(parent: bytes, adapter_uid: int, tokens: Sequence[int]) -> bytes:
    """SHA-256 of (parent hash, adapter uid, token ids): names a full block and its whole prefix."""
    h = hashlib.sha256(parent)
    h.update(adapter_uid.to_bytes(8, "little", signed=True))
    h.update(array("q", tokens).tobytes())
    return h.digest()


@dataclass(eq=False)
class CachedBlock:
    block_hash: bytes
    adapter_uid: int
    pages: tuple[int, ...]  # one per layer


@dataclass
class PrefixCacheStats:
    """Counters for /metrics: tokens looked up and found (vLLM's queries/hits), separately for
    requests recomputed after preemption."""

    queries: int = 0
    hits: int = 0
    preempted_queries: int = 0
    preempted_hits: int = 0
    dropped_blocks: int = 0  # blocks of retired adapter versions


class PrefixCache:
    enabled = True

    def __init__(self, pool: PagePool, layout: PageLayout) -> None:
        self.pool = pool
        self.layout = layout
        self.stats = PrefixCacheStats()
        self._blocks: dict[bytes, CachedBlock] = {}
        self._by_page: dict[int, CachedBlock] = {}  # a block's layer-0 page -> the block
        self._by_adapter: dict[int, set[bytes]] = {}
        pool.set_reclaimer("kv_block", self._forget)

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_parked_blocks(self) -> int:
        return self.pool.used("cached") // self.layout.num_layers

    def block_hashes(self, req: Request, num_tokens: int) -> list[bytes]:
        """Hashes of ``req``'s full blocks within its first ``num_tokens`` tokens, extending the
        list kept on the request (its tokens only ever grow, so earlier hashes stay valid)."""
        bs = self.layout.block_size
        uid = BASE_UID if req.adapter_uid is None else req.adapter_uid
        hashes = req.block_hashes
        for b in range(len(hashes), num_tokens // bs):
            parent = hashes[-1] if hashes else b""
            hashes.append(hash_block(parent, uid, req.token_slice(b * bs, (b + 1) * bs)))
        return hashes[: num_tokens // bs]

    def lookup(self, req: Request) -> list[CachedBlock]:
        """The longest chain of cached blocks matching ``req``'s tokens, leaving at least its last
        token to compute. Changes nothing."""
        found = []
        for h in self.block_hashes(req, req.num_tokens - 1):
            block = self._blocks.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def acquire(self, blocks: list[CachedBlock]) -> None:
        """A request reads ``blocks``: one more reference each; parked ones are taken back."""
        for block in blocks:
            if self.pool.unpark("kv_block", block.block_hash):
                self.pool.retag(block.pages, "kv")
            self.pool.incref(list(block.pages))

    def register(self, req: Request, num_tokens: int) -> None:
        """Cache ``req``'s blocks that are full within its first ``num_tokens`` tokens."""
        hashes = self.block_hashes(req, num_tokens)
        uid = BASE_UID if req.adapter_uid is None else req.adapter_uid
        for b in range(req.num_offered_blocks, len(hashes)):
            pages = tuple(layer[b] for layer in req.block_table)
            h = hashes[b]
            if h not in self._blocks and pages[0] not in self._by_page:
                block = CachedBlock(h, uid, pages)
                self._blocks[h] = block
                self._by_page[pages[0]] = block
                self._by_adapter.setdefault(uid, set()).add(h)
                self.pool.incref(list(pages))  # the cache's own reference
        req.num_offered_blocks = max(req.num_offered_blocks, len(hashes))

    def release(self, pages: list[int]) -> bool:
        """A request lets go of the block whose pages are ``pages``. False if it isn't a cached
        block (the caller frees it); parks the block when no request reads it any more."""
        block = self._by_page.get(pages[0])
        if block is None:
            return False
        self.pool.free(pages)
        if self.pool.refcount(pages[0]) == 1:
            self.pool.retag(block.pages, "cached")
            self.pool.park("kv_block", block.block_hash, block.pages)
        return True

    def record(self, req: Request, hit_blocks: int) -> None:
        """Count one lookup of an admitted request."""
        hit = hit_blocks * self.layout.block_size
        if req.num_preemptions:
            self.stats.preempted_queries += req.num_tokens
            self.stats.preempted_hits += hit
        else:
            self.stats.queries += req.num_tokens
            self.stats.hits += hit

    def drop_adapter(self, uid: int) -> None:
        """Forget every block computed under a retired adapter uid, freeing the unreferenced ones."""
        for h in sorted(self._by_adapter.get(uid, ())):
            self._drop(self._blocks[h])
            self.stats.dropped_blocks += 1

    def clear(self) -> None:
        """Forget every block (after a failed step, whose blocks may never have been written)."""
        for block in list(self._blocks.values()):
            self._drop(block)

    def _drop(self, block: CachedBlock) -> None:
        parked = self.pool.unpark("kv_block", block.block_hash)
        self._unregister(block)
        if parked:
            self.pool.retag(block.pages, "kv")
        # Drop the cache's reference: a parked block's pages are free now; a block still being
        # read becomes those requests' own, freed when the last of them ends.
        self.pool.free(list(block.pages))

    def _forget(self, key: Hashable) -> None:
        """The pool reclaimed a parked block (its pages are free already)."""
        assert isinstance(key, bytes)
        self._unregister(self._blocks[key])

    def _unregister(self, block: CachedBlock) -> None:
        del self._blocks[block.block_hash]
        del self._by_page[block.pages[0]]
        uid_blocks = self._by_adapter[block.adapter_uid]
        uid_blocks.discard(block.block_hash)
        if not uid_blocks:
            del self._by_adapter[block.adapter_uid]


class NoPrefixCache:
    """Prefix caching turned off: nothing is found, nothing is kept."""

    enabled = False
    num_blocks = 0
    num_parked_blocks = 0

    def __init__(self) -> None:
        self.stats = PrefixCacheStats()

    def lookup(self, req: Request) -> list[CachedBlock]:
        return []

    def acquire(self, blocks: list[CachedBlock]) -> None:
        pass

    def register(self, req: Request, num_tokens: int) -> None:
        pass

    def release(self, pages: list[int]) -> bool:
        return False

    def record(self, req: Request, hit_blocks: int) -> None:
        pass

    def drop_adapter(self, uid: int) -> None:
        pass

    def clear(self) -> None:
        pass
