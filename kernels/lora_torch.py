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

A DoRA module keeps its scale ``g_m`` beside its ``B^T``: ``y[rows_a, cols_m] = g_m * (y + delta)``.
For the embed_tokens group (a gather) ``A_cat`` is the stored ``A.T`` and ``v = A_cat[ids]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kernels.lora import LoraSegments, Rows
from kernels.lora_backend import LoraBackend, LoraStep
from kernels.lora_pages import AdapterWeights, read_dora_scale, read_lora_weights
from kernels.page_writer import PageWriter
from kernels.step_buffer import StepPack
from server.model_config import GATHER, SAMPLES, LoraGroup
from server.page_layout import AdapterPageTable, LoraMatrixPages, PageLayout

Part = tuple[int, int, int, int, torch.Tensor, float, torch.Tensor | None, bool]


@dataclass(frozen=True)
class FusedWeights:
    """One adapter's weights for a module group: ``A_cat [R, K]`` (a gather group: ``A.T [K, R]``)
    and, per module it has, ``(first row of v, last row, first output column, last column,
    B^T [r_m, w_m], scale_m, DoRA scale g_m [w_m] or None, replace)``; ``w_m`` is the module's
    ``out_features`` (at lm_head it may differ between adapters)."""

    a_cat: torch.Tensor
    parts: tuple[Part, ...]
    gather: bool = False


FusedEntry = FusedWeights | None
Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # A, B^T, g


def build_fused(parts: Sequence[Weights | None], mats: Sequence[LoraMatrixPages | None],
                widths: Sequence[int], gather: bool = False) -> FusedEntry:
    """Stack one adapter's ``(A, B^T, g)`` per module of a group; None if it has none of them."""
    present = [(i, p, m) for i, (p, m) in enumerate(zip(parts, mats, strict=True)) if p is not None]
    if not present:
        return None
    out = []
    row = 0
    for i, (a, bt, g), mat in present:
        col = sum(widths[:i])
        out.append((row, row + a.shape[0], col, col + mat.out_features, bt.contiguous(), mat.scale, g,
                    mat.replace))
        row += a.shape[0]
    if gather:  # one module (embed_tokens): keep A.T, the stored orientation, for row lookups
        return FusedWeights(present[0][1][0].t().contiguous(), tuple(out), gather=True)
    return FusedWeights(torch.cat([p[0] for _, p, _ in present]).contiguous(), tuple(out))


def _shrink(fw: FusedWeights, x: torch.Tensor, rows: Rows) -> torch.Tensor:
    xr = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
    return fw.a_cat[xr.long()] if fw.gather else xr @ fw.a_cat.T


def _expand(delta: torch.Tensor, y: torch.Tensor, rows: Rows, v: torch.Tensor, part: Part) -> None:
    """``delta[rows, c0:c1] += scale * v[:, r0:r1] @ B^T``; DoRA or replace: such that ``y + delta``
    becomes ``g * (y + scale * v @ B^T)`` or ``scale * v @ B^T`` (``delta`` is ``y`` itself when
    they share the compute dtype)."""
    r0, r1, c0, c1, bt, scale, g, replace = part
    if g is None and not replace and isinstance(rows, slice):
        delta[rows, c0:c1].addmm_(v[:, r0:r1], bt, alpha=scale)
    elif g is None and not replace:
        delta[:, c0:c1].index_add_(0, rows, v[:, r0:r1] @ bt, alpha=scale)
    else:
        cur = (y[rows, c0:c1] if isinstance(rows, slice) else y[:, c0:c1].index_select(0, rows)).to(v.dtype)
        new = scale * (v[:, r0:r1] @ bt) if replace else (cur + scale * (v[:, r0:r1] @ bt)) * g
        if delta is y and isinstance(rows, slice):
            y[rows, c0:c1] = new
        elif delta is y:
            y[:, c0:c1].index_copy_(0, rows, new)
        elif isinstance(rows, slice):
            delta[rows, c0:c1] += new - cur
        else:
            delta[:, c0:c1].index_add_(0, rows, new - cur)


def apply_fused(groups: Sequence[tuple[slice | torch.Tensor, FusedEntry]], x: torch.Tensor,
                y: torch.Tensor, dtype: torch.dtype) -> None:
    """``y[rows, cols_m] += scale_m * (x[rows] @ A_m.T) @ B_m.T`` for every group and module (DoRA
    modules: then scaled by ``g_m``; gather entries: ``x`` holds token ids).

    ``x [T, K]``, ``y [T, N_total]`` (any strides); weights in ``dtype`` (the compute dtype).
    """
    work = [(rows, e) for rows, e in groups if e is not None]
    if not work:
        return
    xc = x if x.dtype == dtype or not x.is_floating_point() else x.to(dtype)
    direct = y.dtype == dtype
    delta = y if direct else y.new_zeros(y.shape, dtype=dtype)
    for rows, fw in work:
        v = _shrink(fw, xc, rows)
        for part in fw.parts:
            _expand(delta, y, rows, v, part)
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

    def _read(self, arena: torch.Tensor, mat: LoraMatrixPages, dtype: str | None) -> Weights:
        a, bt = read_lora_weights(arena, mat, dtype)
        g = read_dora_scale(arena, mat, dtype)
        compute = self.compute_dtype or arena.dtype  # bf16-stored rows compute in the model's dtype
        return a.to(compute), bt.to(compute), None if g is None else g.to(compute)

    def get_fused(self, arena: torch.Tensor, table: AdapterPageTable, layer: int,
                  group: LoraGroup) -> FusedEntry:
        """One adapter's weights for a module group of one layer (see ``build_fused``)."""
        per_adapter = self._fused.setdefault(table.uid, {})
        key = (layer, group.modules)
        if key not in per_adapter:
            mats = [table.modules.get((layer, m)) for m in group.modules]
            parts = [None if m is None else self._read(arena, m, table.dtype) for m in mats]
            per_adapter[key] = build_fused(parts, mats, group.widths, gather=group.kind == GATHER)
        return per_adapter[key]

    def drop(self, uid: int) -> None:
        self._fused.pop(uid, None)

    def __contains__(self, uid: int) -> bool:
        return uid in self._fused

    def __len__(self) -> int:
        return len(self._fused)


class TorchLoraStep(LoraStep):
    def __init__(self, backend: TorchLoraBackend, adapters: Sequence[AdapterPageTable],
                 rows: Mapping[int, Rows], sample_rows: Mapping[int, Rows]) -> None:
        self.backend = backend
        self.adapters = adapters
        self.rows = rows  # slot -> its tokens' rows (computed before the forward)
        self.sample_rows = sample_rows  # slot -> its rows among the sample rows

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, y: torch.Tensor) -> None:
        b = self.backend
        rows = self.sample_rows if group.kind == SAMPLES else self.rows
        cache, arena = b.cache, b.arena
        work = [(r, cache.get_fused(arena, self.adapters[slot], layer, group)) for slot, r in rows.items()]
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
                     pack: StepPack, samples: LoraSegments | None = None) -> LoraStep:
        self.writer.ready(a.uid for a in adapters)
        device = self.arena.device
        return TorchLoraStep(self, adapters, segments.row_groups(device),
                             samples.row_groups(device) if samples is not None else {})
