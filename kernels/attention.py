"""Paged KV store and paged attention: pure-torch references (the specification; the CPU path).

``kv_pages`` is ``arena.view(num_pages, 2, block_size, KVH, D)``: page ``p`` holds one KV block of
one layer, K at ``[p, 0]`` and V at ``[p, 1]``. A token's slot is ``page * block_size + offset``.

Why the attention is split into a decode group and per-sequence prefills: a decode step of 64
sequences x 30 layers as 1,920 separate SDPA calls spends most of its time in Python and dispatch.
All single-token queries are therefore gathered into one padded batch (whole pages, masked past each
sequence's context) and run as one SDPA call per layer. Under GQA the ``H // KVH`` query heads that
share a KV head become the query-length axis of that batch, so K/V are never repeated. Prefill chunks
have many queries each, so padding them together would waste more than the per-call overhead costs;
they run one SDPA call per sequence. Everything that depends only on positions (which sequences
decode, page counts, masks) is computed once per step and cached on the ``AttnMeta``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class _DecodePlan:
    rows: torch.Tensor  # [Sd] int64: rows of q (one query token per sequence)
    seqs: torch.Tensor  # [Sd] int64: sequence index of each row
    num_blocks: int  # pages gathered per sequence (covers the longest context in the group)
    mask: torch.Tensor  # [Sd, 1, 1, num_blocks * block_size] additive: 0 = attend, -inf = padding


@dataclass(frozen=True)
class PrefillPlan:
    seq: int
    q_start: int
    q_end: int
    ctx_len: int
    num_blocks: int
    mask: torch.Tensor | None  # [q_len, ctx_len] additive, or None when plain causal (ctx_len == q_len)


@dataclass(frozen=True)
class _CpuPlan:
    block_size: int
    dtype: torch.dtype
    decode: _DecodePlan | None
    prefills: tuple[PrefillPlan, ...]


PlanT = TypeVar("PlanT")


@dataclass
class AttnMeta:
    """Per-step attention metadata, built once by the batch builder and shared by all layers.

    block_tables: [L, S, max_blocks] int32 (padding 0); slot_mapping: [L, T] int32 or int64 (-1 = skip);
    cu_q_lens: [S+1] int32, rows ``cu_q_lens[s]:cu_q_lens[s+1]`` of q belong to sequence s;
    ctx_lens: [S] int32, context length of s after this step's tokens are stored.
    Query row j of s sits at position ``ctx_lens[s] - q_len_s + j`` and attends keys ``0..position``.
    ``host_cu_q_lens`` / ``host_ctx_lens`` are the same values as Python ints, so that no op has to
    read them back from the device (a sync on a GPU).
    """

    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    cu_q_lens: torch.Tensor
    ctx_lens: torch.Tensor
    max_q_len: int
    max_ctx_len: int
    host_cu_q_lens: tuple[int, ...]
    host_ctx_lens: tuple[int, ...]
    _plans: dict[object, object] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.host_ctx_lens)

    def cached(self, key: object, build: Callable[[], PlanT]) -> PlanT:
        """A layer-independent plan of an attention op: built on first use, reused by every layer."""
        if key not in self._plans:
            self._plans[key] = build()
        return self._plans[key]  # type: ignore[return-value]

    def cpu_plan(self, block_size: int, dtype: torch.dtype) -> _CpuPlan:
        """Layer-independent gather plan of the torch path, computed on first use and cached.

        Masks are additive in the query dtype: SDPA converts a boolean mask on every call.
        """
        return self.cached(("torch", block_size, dtype), lambda: _build_cpu_plan(
            self.host_cu_q_lens, self.host_ctx_lens, block_size, dtype, self.ctx_lens.device))


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, -torch.inf)


def prefill_plan(seq: int, q_start: int, q_end: int, ctx_len: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> PrefillPlan:
    """One chunk's gather plan; its causal mask is additive in ``dtype`` (None when plain causal)."""
    q_len = q_end - q_start
    mask = None
    if ctx_len != q_len:
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)
        mask = _additive(torch.arange(ctx_len, device=device)[None, :] <= q_pos[:, None], dtype)
    return PrefillPlan(seq, q_start, q_end, ctx_len, -(-ctx_len // block_size), mask)


def _build_cpu_plan(cu_q: tuple[int, ...], ctx: tuple[int, ...], block_size: int, dtype: torch.dtype,
                    device: torch.device) -> _CpuPlan:
    dec_rows: list[int] = []
    dec_seqs: list[int] = []
    prefills: list[PrefillPlan] = []
    for s, ctx_len in enumerate(ctx):
        q0, q1 = cu_q[s], cu_q[s + 1]
        q_len = q1 - q0
        if q_len == 1:
            dec_rows.append(q0)
            dec_seqs.append(s)
        elif q_len > 1:
            prefills.append(prefill_plan(s, q0, q1, ctx_len, block_size, dtype, device))
    decode = None
    if dec_rows:
        dec_ctx = torch.tensor([ctx[s] for s in dec_seqs], device=device)
        nblk = -(-int(dec_ctx.max()) // block_size)
        mask = torch.arange(nblk * block_size, device=device)[None, :] < dec_ctx[:, None]
        decode = _DecodePlan(
            rows=torch.tensor(dec_rows, dtype=torch.int64, device=device),
            seqs=torch.tensor(dec_seqs, dtype=torch.int64, device=device),
            num_blocks=nblk,
            mask=_additive(mask[:, None, None, :], dtype),
        )
    return _CpuPlan(block_size, dtype, decode, tuple(prefills))


def store_kv_ref(kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Write each token's K and V into its slot: ``kv_pages[slot // bs, 0|1, slot % bs] = k[t] | v[t]``.

    kv_pages: [num_pages, 2, block_size, KVH, D]; k, v: [T, KVH, D]; slot_mapping: [T] int32/int64,
    ``slot = page * block_size + offset``; slot -1 means skip the token. In place.
    """
    block_size = kv_pages.shape[2]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    pages = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping - pages * block_size
    kv_pages[pages, 0, offsets] = k.to(kv_pages.dtype)
    kv_pages[pages, 1, offsets] = v.to(kv_pages.dtype)


def _gather_blocks(kv_pages: torch.Tensor, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of the given pages in order: pages [n] -> two [n * block_size, KVH, D] tensors."""
    kvh, d = kv_pages.shape[3], kv_pages.shape[4]
    k = kv_pages[:, 0].index_select(0, pages).view(-1, kvh, d)
    v = kv_pages[:, 1].index_select(0, pages).view(-1, kvh, d)
    return k, v


def _decode_attention(q: torch.Tensor, kv_pages: torch.Tensor, block_table: torch.Tensor,
                      plan: _DecodePlan, scale: float) -> torch.Tensor:
    """All single-query sequences at once: returns [Sd, H, D] for rows ``plan.rows`` of q."""
    kvh, d = kv_pages.shape[3], kv_pages.shape[4]
    sd, h = plan.rows.shape[0], q.shape[1]
    pages = block_table.index_select(0, plan.seqs)[:, : plan.num_blocks].reshape(-1)
    k, v = _gather_blocks(kv_pages, pages)
    k = k.view(sd, -1, kvh, d).transpose(1, 2)  # [Sd, KVH, Lk, D]
    v = v.view(sd, -1, kvh, d).transpose(1, 2)
    # The G query heads of a KV head act as G query rows against that head's keys.
    qg = q.index_select(0, plan.rows).view(sd, kvh, h // kvh, d)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=plan.mask, scale=scale)
    return out.reshape(sd, h, d)


def prefill_attention(q: torch.Tensor, kv_pages: torch.Tensor, block_table: torch.Tensor,
                       plan: PrefillPlan, scale: float) -> torch.Tensor:
    """One prefill chunk: returns [q_len, H, D] for rows ``q_start:q_end`` of q."""
    k, v = _gather_blocks(kv_pages, block_table[plan.seq, : plan.num_blocks])
    k = k[: plan.ctx_len].transpose(0, 1)  # [KVH, ctx, D]
    v = v[: plan.ctx_len].transpose(0, 1)
    qs = q[plan.q_start : plan.q_end].transpose(0, 1)  # [H, q_len, D]
    # is_causal is top-left aligned, so it is only right for a first chunk (ctx_len == q_len).
    out = F.scaled_dot_product_attention(qs, k, v, attn_mask=plan.mask, is_causal=plan.mask is None,
                                         scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def paged_attention_ref(q: torch.Tensor, kv_pages: torch.Tensor, meta: AttnMeta, layer: int,
                        scale: float) -> torch.Tensor:
    """Varlen causal attention over paged K/V for a batch mixing prefill chunks and decode tokens.

    q: [T, H, D]; kv_pages: [num_pages, 2, block_size, KVH, D] (this step's keys already stored);
    returns [T, H, D]. For row t = cu_q_lens[s] + j at position p = ctx_lens[s] - q_len_s + j:
    ``out[t, h] = softmax(q[t, h] K_s[:p+1, h // G]^T * scale) V_s[:p+1, h // G]`` with G = H // KVH
    and K_s[i] read from page ``block_tables[layer, s, i // block_size]``, offset ``i % block_size``.
    Whole pages are gathered and the slots past a context are masked, so those slots (and padding
    page 0) must hold finite values: allocate the arena with zeros, not ``torch.empty``.
    """
    plan = meta.cpu_plan(kv_pages.shape[2], q.dtype)
    block_table = meta.block_tables[layer].long()
    out = torch.empty_like(q)
    if plan.decode is not None:
        out.index_copy_(0, plan.decode.rows, _decode_attention(q, kv_pages, block_table, plan.decode, scale))
    for p in plan.prefills:
        out[p.q_start : p.q_end] = prefill_attention(q, kv_pages, block_table, p, scale)
    return out
