"""The CPU production path of ``LoraBatch``: cached weights, one shrink per adapter for a module group.

Why: with many adapters in a step, each decoding one or two tokens, the LoRA work is thousands of
tiny matmuls per step (profiled on the 64-adapter scenario: ~120 us per (adapter, module), 65% of
the step). Each costs a fixed dispatch overhead plus reading that adapter's weights from memory, as
they are too many to stay in cache. Modules that read the same input (q, k, v; gate, up) are
therefore shrunk together: for adapter ``a``, ``A_cat`` stacks the modules' ``A`` rows (``sum r_m``
rows of ``K``), one matmul gives every module's ``v``, and each module's expand adds its slice of
``v`` times its own ``B^T`` into its own output columns::

    v = x[rows_a] @ A_cat.T;   y[rows_a, cols_m] += scale_m * v[:, rows_m] @ B_m^T

A block-diagonal ``B_cat`` would make the expand one matmul too, but its zero blocks cost more memory
traffic (+70% bytes per group for q/k/v) than the saved dispatches (measured: slower). The deltas of
all groups go into one buffer in the compute dtype, added to ``y`` once (one rounding for bf16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels.lora_native import AdapterRows
from kernels.lora_pages import read_lora_weights
from server.page_layout import AdapterPageTable, LoraMatrixPages, PageLayout


@dataclass(frozen=True)
class FusedWeights:
    """One adapter's weights for a module group: ``A_cat [R, K]`` and, per module it has,
    ``(first row of v, last row, first output column, last column, B^T [r_m, w_m], scale_m)``."""

    a_cat: torch.Tensor
    parts: tuple[tuple[int, int, int, int, torch.Tensor, float], ...]


FusedEntry = FusedWeights | None


def build_fused(parts: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
                mats: Sequence[LoraMatrixPages | None], widths: Sequence[int]) -> FusedEntry:
    """Stack one adapter's ``(A, B^T)`` per module of a group; None if it has none of them."""
    present = [(i, p, m) for i, (p, m) in enumerate(zip(parts, mats, strict=True)) if p is not None]
    if not present:
        return None
    out = []
    row = 0
    for i, (a, bt), mat in present:
        col = sum(widths[:i])
        out.append((row, row + a.shape[0], col, col + widths[i], bt.contiguous(), mat.scale))
        row += a.shape[0]
    return FusedWeights(torch.cat([p[0] for _, p, _ in present]).contiguous(), tuple(out))


def apply_fused(groups: Sequence[tuple[slice | torch.Tensor, FusedEntry]], x: torch.Tensor,
                y: torch.Tensor, dtype: torch.dtype) -> None:
    """``y[rows, cols_m] += scale_m * (x[rows] @ A_m.T) @ B_m.T`` for every group and module.

    ``x [T, K]``, ``y [T, N_total]`` (any strides); weights in ``dtype`` (the compute dtype).
    """
    work = [(rows, e) for rows, e in groups if e is not None]
    if not work:
        return
    xc = x if x.dtype == dtype else x.to(dtype)
    direct = y.dtype == dtype
    delta = y if direct else y.new_zeros(y.shape, dtype=dtype)
    for rows, fw in work:
        if isinstance(rows, slice):
            v = xc[rows] @ fw.a_cat.T
            out = delta[rows]
            for r0, r1, c0, c1, bt, scale in fw.parts:
                out[:, c0:c1].addmm_(v[:, r0:r1], bt, alpha=scale)
        else:
            v = xc.index_select(0, rows) @ fw.a_cat.T
            for r0, r1, c0, c1, bt, scale in fw.parts:
                delta[:, c0:c1].index_add_(0, rows, v[:, r0:r1] @ bt, alpha=scale)
    if not direct:
        y.add_(delta)


class GatherCache:
    """Contiguous copies ``(A, B^T)`` of resident adapters' pages, kept across engine steps.

    Keyed by adapter uid: uids are never reused and an adapter's pages never change while it is
    resident, so an entry stays valid until ``drop(uid)`` (call it when the adapter is evicted, or the
    copies outlive it). Costs host memory equal to the resident adapters' weights. Not thread-safe:
    one runner thread owns it.

    ``compute_dtype`` (default: the arena's) is the dtype copies are kept and multiplied in. On CPU
    with a bf16 arena, ``torch.float32`` is faster for decode-sized groups: small bf16 matmuls pay a
    fixed ~15-40 us each, fp32 ones ~3-7 us (measured; costs twice the cache memory). The result is
    rounded to ``y``'s dtype once.
    """

    def __init__(self, compute_dtype: torch.dtype | None = None) -> None:
        self.compute_dtype = compute_dtype
        self._entries: dict[int, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]] = {}
        self._fused: dict[int, dict[tuple[int, tuple[str, ...]], FusedEntry]] = {}
        self._rows: dict[int, AdapterRows] = {}

    def _read(self, arena: torch.Tensor, mat: LoraMatrixPages) -> tuple[torch.Tensor, torch.Tensor]:
        a, bt = read_lora_weights(arena, mat)
        if self.compute_dtype is not None:
            a, bt = a.to(self.compute_dtype), bt.to(self.compute_dtype)
        return a, bt

    def get(
        self, arena: torch.Tensor, uid: int, key: tuple[int, str], mat: LoraMatrixPages
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B^T)`` of one (layer, module) of adapter ``uid``."""
        per_adapter = self._entries.setdefault(uid, {})
        hit = per_adapter.get(key)
        if hit is None:
            hit = per_adapter[key] = self._read(arena, mat)
        return hit

    def get_fused(self, arena: torch.Tensor, table: AdapterPageTable, layer: int,
                  modules: tuple[str, ...], widths: tuple[int, ...]) -> FusedEntry:
        """One adapter's weights for a module group of one layer (see ``build_fused``)."""
        per_adapter = self._fused.setdefault(table.uid, {})
        key = (layer, modules)
        if key not in per_adapter:
            mats = [table.modules.get((layer, m)) for m in modules]
            parts = [None if m is None else self._read(arena, m) for m in mats]
            per_adapter[key] = build_fused(parts, mats, widths)
        return per_adapter[key]

    def native_rows(self, table: AdapterPageTable, layout: PageLayout) -> AdapterRows:
        """The native kernel's row offsets and descriptors of adapter ``table.uid`` (no weight copy)."""
        hit = self._rows.get(table.uid)
        if hit is None:
            hit = self._rows[table.uid] = AdapterRows(table, layout.num_layers, layout.page_elems)
        return hit

    def drop(self, uid: int) -> None:
        self._entries.pop(uid, None)
        self._fused.pop(uid, None)
        self._rows.pop(uid, None)

    def __contains__(self, uid: int) -> bool:
        return uid in self._entries or uid in self._fused or uid in self._rows

    def __len__(self) -> int:
        return len(self._entries.keys() | self._fused.keys() | self._rows.keys())
