"""Batched multi-adapter LoRA over the paged arena: the torch reference ops (the specification).

A step's tokens (rows of ``x``) are cut into segments; segment ``s`` is rows
``seg_starts[s]:seg_starts[s + 1]`` and uses adapter slot ``seg_slots[s]`` (``-1``: no adapter).
Several segments may share a slot, segments need not be sorted by slot, and may be empty. Slot
``a``'s weights for one (layer, module) are a ``LoraMatrixPages``: ``A_a`` (``r_a`` rows of ``K``)
and ``B_a`` transposed (``r_a`` rows of ``N``), laid out in pages as in ``server/page_layout.py``.

Semantics, for every token ``t`` of a segment of slot ``a``::

    v[t, :r_a] = x[t] @ A_a.T          v[t, r_a:] = 0          (shrink)
    y[t]      += scale_a * v[t, :r_a] @ B_a.T                    (expand, in place)

Tokens with no adapter (or whose adapter lacks the module) get nothing. Work is grouped by slot and
done at each adapter's own rank: nothing is padded to the batch's maximum rank.

Two variants, per module:

* DoRA (``g_a``, the module's per-output scale, stored in its pages): the expand's epilogue scales
  the whole output row, base part included, ``y[t] = g_a * (y[t] + scale_a * v[t, :r_a] @ B_a.T)``;
  ``y`` must hold exactly the base layer's output when the call is made.
* a gather shrink (embed_tokens: ``x`` holds token ids, ``A_a`` is stored transposed):
  ``v[t, :r_a] = A_a.T[x[t]]``, i.e. ``x[t]`` as a one-hot row;
* replace (a module's full copy, modules_to_save): ``y[t] = scale_a * v[t, :r_a] @ B_a.T``, the
  base output dropped.

A module writes the first ``out_features`` columns of its block of ``y``: at the lm_head site an
adapter with added tokens has more than the base vocabulary (``y`` is as wide as the widest), a
plain one fewer.

``lora_group_ref`` states what a backend's ``LoraStep.apply(layer, group, x, y)`` computes
(kernels/lora_backend.py): the two ops above for each module of a ``LoraGroup``, each into its own
column block of ``y``. The backends (torch, native C, Triton) are tested against these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kernels.lora_pages import read_dora_scale, read_lora_weights
from server.model_config import GATHER, LoraGroup
from server.page_layout import AdapterPageTable, LoraMatrixPages

Rows = slice | torch.Tensor  # one contiguous run of rows, or an int64 index tensor


@dataclass(frozen=True)
class LoraSegments:
    """Segments of a step's tokens and their adapter slots; shared by every (layer, module) call."""

    seg_starts: tuple[int, ...]  # [S + 1], nondecreasing, seg_starts[0] == 0
    seg_slots: tuple[int, ...]  # [S], -1 = no adapter
    _memo: dict[object, object] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        starts = self.seg_starts
        if len(starts) != len(self.seg_slots) + 1 or starts[0] != 0:
            raise ValueError("seg_starts must have len(seg_slots) + 1 entries starting at 0")
        if any(b < a for a, b in zip(starts[:-1], starts[1:], strict=True)):
            raise ValueError("seg_starts must be nondecreasing")
        if any(s < -1 for s in self.seg_slots):
            raise ValueError("adapter slots must be >= -1")

    @property
    def num_tokens(self) -> int:
        return self.seg_starts[-1]

    @property
    def has_adapter_tokens(self) -> bool:
        starts = self.seg_starts
        return any(slot >= 0 and starts[s + 1] > starts[s] for s, slot in enumerate(self.seg_slots))

    def row_groups(self, device: torch.device) -> dict[int, Rows]:
        """Rows of each used slot: a slice when they form one run, else an int64 index tensor."""
        key = ("groups", device)
        if key not in self._memo:
            runs: dict[int, list[tuple[int, int]]] = {}
            for s, slot in enumerate(self.seg_slots):
                start, end = self.seg_starts[s], self.seg_starts[s + 1]
                if slot < 0 or end == start:
                    continue
                slot_runs = runs.setdefault(slot, [])
                if slot_runs and slot_runs[-1][1] == start:
                    slot_runs[-1] = (slot_runs[-1][0], end)
                else:
                    slot_runs.append((start, end))
            self._memo[key] = {slot: _rows(r, device) for slot, r in runs.items()}
        return self._memo[key]  # type: ignore[return-value]


def _rows(runs: list[tuple[int, int]], device: torch.device) -> Rows:
    if len(runs) == 1:
        return slice(*runs[0])
    return torch.cat([torch.arange(a, b) for a, b in runs]).to(device)


@dataclass(frozen=True)
class LoraArgs:
    """One shrink/expand call: the step's segments and, per slot, that module's pages (or None) and
    its adapter's storage dtype (empty: every slot in the arena's dtype)."""

    segments: LoraSegments
    mats: tuple[LoraMatrixPages | None, ...]  # indexed by slot
    dtypes: tuple[str | None, ...] = ()
    _memo: dict[object, object] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if any(s >= len(self.mats) for s in self.segments.seg_slots):
            raise ValueError(f"a segment uses a slot >= {len(self.mats)}")
        shapes = {m.in_features for m in self.mats if m is not None and not m.a_transposed}
        if len(shapes) > 1:
            raise ValueError(f"adapters disagree on the module's input width: {sorted(shapes)}")

    @property
    def max_rank(self) -> int:
        """Width ``R`` of the shrink output: the largest rank among slots that have this module."""
        return max((m.rank for m in self.mats if m is not None), default=0)


    def weights(self, arena: torch.Tensor, slot: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Slot ``slot``'s ``(A, B^T, g or None)`` read from its pages, in the compute ``dtype``."""
        mat = self.mats[slot]
        assert mat is not None
        stored = self.dtypes[slot] if self.dtypes else None
        a, bt = read_lora_weights(arena, mat, stored)
        g = read_dora_scale(arena, mat, stored)
        return a.to(dtype), bt.to(dtype), None if g is None else g.to(dtype)


def _groups(args: LoraArgs, arena: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """Yield ``(rows, mat, A, B^T, g)`` per slot that has tokens and this module (weights in ``dtype``)."""
    for slot, rows in args.segments.row_groups(device).items():
        mat = args.mats[slot]
        if mat is not None:
            yield (rows, mat, *args.weights(arena, slot, dtype))


def lora_shrink_ref(x: torch.Tensor, arena: torch.Tensor, args: LoraArgs,
                    gather: bool = False) -> torch.Tensor:
    """``x [T, K] -> v [T, R]`` with ``v[t, :r_a] = x[t] @ A_a.T``, zeros elsewhere; ``R = args.max_rank``.

    ``arena [num_pages, page_elems]`` holds the pages; one matmul per slot, at that slot's rank.
    ``gather``: ``x [T]`` holds token ids and ``v[t, :r_a] = A_a.T[x[t]]`` (a one-hot ``x[t]``).
    """
    if gather:
        v = arena.new_zeros(x.shape[0], args.max_rank)
        for rows, mat, a, _, _ in _groups(args, arena, x.device, arena.dtype):
            v[rows, : mat.rank] = a.t()[x[rows].long()]
        return v
    v = x.new_zeros(x.shape[0], args.max_rank)
    for rows, mat, a, _, _ in _groups(args, arena, x.device, x.dtype):
        if isinstance(rows, slice):
            v[rows, : mat.rank] = x[rows] @ a.T
        else:
            v[rows, : mat.rank] = x.index_select(0, rows) @ a.T
    return v


def lora_expand_ref(v: torch.Tensor, arena: torch.Tensor, args: LoraArgs, y: torch.Tensor) -> None:
    """``y[t] += scale_a * v[t, :r_a] @ B_a.T`` in place for ``v [T, R]``, ``y [T, N]`` (any strides);
    for a DoRA module ``y[t] = g_a * (y[t] + scale_a * v[t, :r_a] @ B_a.T)``; for a full copy
    ``y[t] = scale_a * v[t, :r_a] @ B_a.T``. Each writes the first ``out_features`` columns."""
    for rows, mat, _, bt, g in _groups(args, arena, v.device, v.dtype):
        vr = v[rows] if isinstance(rows, slice) else v.index_select(0, rows)
        _add_rows(y[:, : mat.out_features], rows, vr[:, : mat.rank], bt, mat.scale, g, mat.replace)


def _add_rows(y: torch.Tensor, rows: Rows, v: torch.Tensor, bt: torch.Tensor, scale: float,
              g: torch.Tensor | None = None, replace: bool = False) -> None:
    """``y[rows] += scale * v @ bt``, or ``y[rows] = g * (y[rows] + scale * v @ bt)`` (DoRA), or
    ``y[rows] = scale * v @ bt`` (``replace``); ``v``/``bt`` may be in a wider compute dtype than ``y``."""
    if g is not None or replace:
        new = scale * (v @ bt)
        if not replace:
            cur = y[rows] if isinstance(rows, slice) else y.index_select(0, rows)
            new = (cur.to(v.dtype) + new) * g.to(v.dtype)
        new = new.to(y.dtype)
        if isinstance(rows, slice):
            y[rows] = new
        else:
            y.index_copy_(0, rows, new)
    elif isinstance(rows, slice) and v.dtype == y.dtype:
        y[rows].addmm_(v, bt, alpha=scale)
    elif isinstance(rows, slice):
        y[rows].add_(v @ bt, alpha=scale)
    else:
        y.index_add_(0, rows, (v @ bt).to(y.dtype), alpha=scale)


def lora_group_ref(arena: torch.Tensor, segments: LoraSegments, adapters: Sequence[AdapterPageTable],
                   layer: int, group: LoraGroup, x: torch.Tensor, y: torch.Tensor) -> None:
    """``y[t, cols_m] += scale_a * (x[t] @ A_a.T) @ B_a.T`` for each module ``m`` of ``group``, where
    ``a`` is token ``t``'s adapter (``adapters[slot]``) and ``(A_a, B_a)`` its (layer, m) weights;
    a DoRA module scales ``y[t, cols_m]`` by its ``g_a`` after the addition (module docstring).

    ``x [T, group.in_features]`` (a ``GATHER`` group: token ids ``[T]``); ``y [T, group.out_features]``
    (any strides), module ``m`` writing columns ``group.cols[m] : group.cols[m] + group.widths[m]``.
    Tokens without an adapter, or whose adapter lacks (layer, m), get nothing in those columns.
    ``segments`` are those of ``x``'s rows: for a ``SAMPLES`` group, the step's sample rows.
    """
    for module, col, width in zip(group.modules, group.cols, group.widths, strict=True):
        mats = tuple(a.modules.get((layer, module)) for a in adapters)
        if any(m is not None for m in mats):
            args = LoraArgs(segments, mats, tuple(a.dtype for a in adapters))
            v = lora_shrink_ref(x, arena, args, gather=group.kind == GATHER)
            lora_expand_ref(v, arena, args, y[:, col : col + width])
