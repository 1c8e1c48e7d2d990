"""Triton paged KV store and paged attention (same semantics as ``kernels.attention``).

This is the only module of the attention ops that imports triton; ``kernels.backend`` imports it
lazily, so the package still imports on machines where triton cannot run.

The attention kernel reads K/V in place from the pages through the block table (no gather). One
program handles one (sequence, KV head, tile of query rows). Its ``BLOCK_M`` rows are the
flattened (query token, head-in-group) pairs of that KV head, so under GQA a decode token's
``H // KVH`` heads share one pass over the keys, and a prefill chunk's tokens fill the tile.
Softmax is computed online in fp32 (flash-attention style).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.attention import AttnMeta

# Triton 3.9's interpreter returns garbage from tl.dot on bf16 operands, so under the interpreter the
# operands are upcast to fp32 (exact) first; compiled kernels keep the native bf16 dot.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Finite "minus infinity": fully masked tile rows (padding rows past q_len) stay NaN-free.
_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kv_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_page, stride_kv, stride_tok, stride_head, block_size, num_kv_heads,
                     head_dim, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    page = slot // block_size
    off = slot % block_size
    e = tl.arange(0, BLOCK)
    h = e // head_dim
    d = e % head_dim
    ok = e < num_kv_heads * head_dim
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=ok)
    dst = kv_ptr + page * stride_page + off * stride_tok + h * stride_head + d
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + stride_kv, v.to(kv_ptr.dtype.element_ty), mask=ok)


def store_kv_triton(kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Same as ``store_kv_ref``: ``kv_pages[slot // bs, 0|1, slot % bs] = k[t] | v[t]``, slot -1 skips.

    kv_pages: [num_pages, 2, block_size, KVH, D] with unit stride on D; k, v: [T, KVH, D].
    """
    _, _, block_size, kvh, d = kv_pages.shape
    if kv_pages.stride(4) != 1:
        raise ValueError("kv_pages must have unit stride on head_dim")
    k = k if k.stride(2) == 1 else k.contiguous()
    v = v if v.stride(2) == 1 else v.contiguous()
    t = k.shape[0]
    if t == 0:
        return
    _store_kv_kernel[(t,)](
        k, v, kv_pages, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2), kv_pages.stride(3),
        block_size, kvh, d, BLOCK=triton.next_power_of_2(kvh * d),
    )


@triton.jit
def _paged_attn_kernel(q_ptr, o_ptr, kv_ptr, bt_ptr, cu_ptr, ctx_ptr,
                       stride_qt, stride_qh, stride_ot, stride_oh,
                       stride_page, stride_kv, stride_tok, stride_head, stride_bts,
                       scale, group, head_dim, block_size,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(cu_ptr + s)
    q_len = tl.load(cu_ptr + s + 1) - q_start
    if tile * BLOCK_M >= q_len * group:
        return
    ctx = tl.load(ctx_ptr + s)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // group
    head = kvh * group + rows % group
    row_ok = tok < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_off = (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = ctx - q_len + tok
    last_tok = tl.minimum(q_len, (tile + 1) * BLOCK_M // group + 1) - 1
    hi = ctx - q_len + last_tok + 1  # keys past the tile's last query are never attended
    m_i = tl.full([BLOCK_M], _NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bts
    for start in range(0, hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        k_ok = kpos < hi
        page = tl.load(bt_row + kpos // block_size, mask=k_ok, other=0).to(tl.int64)
        base = page * stride_page + (kpos % block_size) * stride_tok + kvh * stride_head
        kv_off = base[:, None] + offs_d[None, :]
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(kv_ptr + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        qk = tl.where((kpos[None, :] <= q_pos[:, None]) & k_ok[None, :], qk, _NEG)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(kv_ptr + stride_kv + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_off = (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_attention_triton(q: torch.Tensor, kv_pages: torch.Tensor, meta: AttnMeta, layer: int,
                           scale: float, block_n: int = 64) -> torch.Tensor:
    """Same as ``paged_attention_ref``: varlen causal GQA attention over paged K/V.

    q: [T, H, D]; kv_pages: [num_pages, 2, block_size, KVH, D]; returns [T, H, D] in q's dtype.
    ``out[t, h] = softmax(q[t, h] K_s[:p+1, h // G]^T * scale) V_s[:p+1, h // G]`` where row t is
    query j of sequence s at position ``p = ctx_lens[s] - q_len_s + j``.
    """
    t, h, d = q.shape
    kvh = kv_pages.shape[3]
    if kv_pages.stride(4) != 1:
        raise ValueError("kv_pages must have unit stride on head_dim")
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    group = h // kvh
    upcast = _INTERPRET and q.dtype == torch.bfloat16
    block_m = 16 if meta.max_q_len * group <= 16 else 64
    bt = meta.block_tables[layer]
    if bt.stride(1) != 1:
        bt = bt.contiguous()
    grid = (meta.num_seqs, kvh, triton.cdiv(meta.max_q_len * group, block_m))
    _paged_attn_kernel[grid](
        q, out, kv_pages, bt, meta.cu_q_lens, meta.ctx_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2), kv_pages.stride(3), bt.stride(0),
        scale, group, d, kv_pages.shape[2],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
    )
    return out
