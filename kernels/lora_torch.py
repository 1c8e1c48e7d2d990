"""The torch LoRA backend: the fallback on any device, and on CPU a cache of gathered weights.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kernels.lora import LoraSegments, Rows
from kernels.lora_backend import LoraBackend, LoraStep
from kernels.lora_pages import AdapterWeights, read_lora_weights
from kernels.page_writer import PageWriter
from kernels.step_buffer import StepPack
from server.model_config import LoraGroup
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
    """Contiguous copies of resident adapters' weights per (layer, module group), kept across steps.

    Keyed by adapter uid: uids are never reused and an adapter's pages never change while it is
    resident, so an entry stays valid until ``drop(uid)`` (called when the adapter is evicted).
    Costs host memory equal to the resident adapters' weights. One runner thread owns it.

    ``compute_dtype`` (default: the arena's) is the dtype copies are kept and multiplied in. On CPU
    with a bf16 arena, ``torch.float32`` is faster for decode-sized groups: small bf16 matmuls pay a
    fixed ~15-40 us each, fp32 ones ~3-7 us (measured; costs twice the cache memory). The result is
    rounded to ``y``'s dtype once.
    """

    def __init__(self, compute_dtype: torch.dtype | None = None) -> None:
        self.compute_dtype = compute_dtype
        self._fused: dict[int, dict[tuple[int, tuple[str, ...]], FusedEntry]] = {}

    def _read(self, arena: torch.Tensor, mat: LoraMatrixPages,
              dtype: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        a, bt = read_lora_weights(arena, mat, dtype)
        compute = self.compute_dtype or arena.dtype  # bf16-stored rows compute in the model's dtype
        return a.to(compute), bt.to(compute)

    def get_fused(self, arena: torch.Tensor, table: AdapterPageTable, layer: int,
                  modules: tuple[str, ...], widths: tuple[int, ...]) -> FusedEntry:
        """One adapter's weights for a module group of one layer (see ``build_fused``)."""
        per_adapter = self._fused.setdefault(table.uid, {})
        key = (layer, modules)
        if key not in per_adapter:
            mats = [table.modules.get((layer, m)) for m in modules]
            parts = [None if m is None else self._read(arena, m, table.dtype) for m in mats]
            per_adapter[key] = build_fused(parts, mats, widths)
        return per_adapter[key]

    def drop(self, uid: int) -> None:
        self._fused.pop(uid, None)

    def __contains__(self, uid: int) -> bool:
        return uid in self._fused

    def __len__(self) -> int:
        return len(self._fused)


class TorchLoraStep(LoraStep):
    def __init__(self, backend: TorchLoraBackend, adapters: Sequence[AdapterPageTable],
                 rows: Mapping[int, Rows]) -> None:
        self.backend = backend
        self.adapters = adapters
        self.rows = rows  # slot -> its tokens' rows (computed before the forward)

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, y: torch.Tensor) -> None:
        b = self.backend
        work = [(rows, b.cache.get_fused(b.arena, self.adapters[slot], layer, group.modules, group.widths))
                for slot, rows in self.rows.items()]
        apply_fused(work, x, y, b.cache.compute_dtype or b.arena.dtype)


class TorchLoraBackend(LoraBackend):
    """LoRA with torch ops: per (adapter, module group), one shrink matmul and one expand per module."""

    name = "torch"

    def __init__(self, arena: torch.Tensor, layout: PageLayout) -> None:
        super().__init__(arena, layout)
        # Small bf16 matmuls are several times slower than fp32 ones on CPU: keep the gathered
        # weights in fp32 there (see GatherCache) and round y once.
        slow_bf16 = arena.device.type == "cpu" and arena.dtype != torch.float32
        self.cache = GatherCache(compute_dtype=torch.float32 if slow_bf16 else None)
        self.writer = PageWriter(arena)

    @property
    def storage_dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(dict.fromkeys((self.arena.dtype, torch.bfloat16)))  # the cache converts on read

    def write_adapter(self, table: AdapterPageTable, weights: AdapterWeights) -> None:
        self.writer.write(table, weights)

    def drop_adapter(self, uid: int) -> None:
        self.cache.drop(uid)
        self.writer.forget(uid)

    def __contains__(self, uid: int) -> bool:
        return uid in self.cache

    def prepare_step(self, segments: LoraSegments, adapters: Sequence[AdapterPageTable],
                     pack: StepPack) -> LoraStep:
        self.writer.ready(a.uid for a in adapters)
        return TorchLoraStep(self, adapters, segments.row_groups(self.arena.device))
