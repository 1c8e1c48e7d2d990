"""Pieces of the Llama forward: linear layers, RMSNorm, rotary embeddings, SwiGLU.

Each follows Hugging Face's ``modeling_llama`` operation for operation (same dtypes, same order)
so that fp32 outputs match it to rounding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from server.model_config import ModelConfig, RopeScaling

log = logging.getLogger(__name__)


class Linear:
    """``y = x @ W.T``. On CPU, ``W`` is reordered once into oneDNN's blocked layout when oneDNN
    supports the dtype here, as vLLM's CPU backend does: measured on a 2-core AVX2 EPYC in fp32,
    1.2-2.2x the GFLOP/s of ``F.linear`` (MKL) for 32-row decode batches (gate/up: 38 -> 84) and
    1.1-1.5x for 512-row prefill chunks. Elsewhere (CUDA; bf16 without AVX-512/AMX) ``F.linear``.
    The results differ from ``F.linear`` only in summation order."""

    def __init__(self, weight: torch.Tensor, prepack: bool) -> None:
        self.weight = weight
        self.packed: torch.Tensor | None = None
        if prepack and weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            except RuntimeError as e:  # e.g. bf16 on a CPU without native bf16
                log.debug("oneDNN cannot prepack a %s weight here: %s", weight.dtype, e)
        if self.packed is not None:
            self.weight = None  # the packed copy replaces it: no second copy of the model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return F.linear(x, self.weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in fp32 and cast back (as HF does)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """The residual add then the next norm: ``h += delta`` in place (HF: ``residual + hidden``, same
    rounding), then ``rms_norm(h, weight, eps)`` as a new tensor."""
    if delta is not None:
        h.add_(delta)
    return rms_norm(h, weight, eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies ``[head_dim // 2]`` in fp32, with llama3 scaling if configured."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if config.rope_scaling is not None:
        inv = _llama3_scale(inv, config.rope_scaling)
    return inv


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


@dataclass
class RopeTables:
    """One step's rotary inputs: positions ``[T]`` (int32) and the fp32 tables ``[max_positions, D]``.
    The C op reads the tables by position; the reference takes per-row cos/sin (looked up once per
    step, on first use, in the model dtype)."""

    positions: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor
    dtype: torch.dtype
    _rows: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, 1, D]`` in the model dtype, for broadcasting over heads."""
        if self._rows is None:
            pos = self.positions
            self._rows = (self.cos_table[pos].to(self.dtype)[:, None, :],
                          self.sin_table[pos].to(self.dtype)[:, None, :])
        return self._rows


class RotaryCache:
    """cos/sin tables ``[max_positions, head_dim]`` (fp32), looked up once per step by position."""

    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device) -> None:
        inv = rope_inv_freq(config).to(device)
        pos = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = pos[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos()
        self.sin = emb.sin()

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, 1, head_dim]`` for broadcasting over heads."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]

    def for_step(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        return RopeTables(positions, self.cos, self.sin, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x: [T, heads, head_dim]`` (HF's half-split layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_store_kv_with(store_kv: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
                       ) -> Callable[..., torch.Tensor]:
    """The reference of the fused RoPE + KV store op over a backend's ``store_kv``."""

    def rope_store_kv(qkv: torch.Tensor, rope: RopeTables, kv_pages: torch.Tensor, slot_mapping: torch.Tensor,
                      num_heads: int, num_kv_heads: int) -> torch.Tensor:
        """RoPE on the q and k heads of ``qkv [T, (H + 2 KVH) D]``; K (roped) and V into their slots
        (``store_kv``'s semantics); returns the roped ``q [T, H, D]``."""
        t, d = qkv.shape[0], kv_pages.shape[-1]
        qs, kvs = num_heads * d, num_kv_heads * d
        cos, sin = rope.rows()
        q = apply_rope(qkv[:, :qs].view(t, num_heads, d), cos, sin)
        k = apply_rope(qkv[:, qs : qs + kvs].view(t, num_kv_heads, d), cos, sin)
        store_kv(kv_pages, k, qkv[:, qs + kvs :].view(t, num_kv_heads, d), slot_mapping)
        return q

    return rope_store_kv


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up = [gate | up]`` along the last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
