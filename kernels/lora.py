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

``lora_group_ref`` states what a backend's ``LoraStep.apply(layer, group, x, y)`` computes
(kernels/lora_backend.py): the two ops above for each module of a ``LoraGroup``, each into its own
column block of ``y``. The backends (torch, native C, Triton) are tested against these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kernels.lora_pages import read_lora_weights
from server.model_config import LoraGroup
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
        shapes = {(m.in_features, m.out_features) for m in self.mats if m is not None}
        if len(shapes) > 1:
            raise ValueError(f"adapters disagree on the module's shape: {sorted(shapes)}")

    @property
    def max_rank(self) -> int:
        """Width ``R`` of the shrink output: the largest rank among slots that have this module."""
        return max((m.rank for m in self.mats if m is not None), default=0)


    def weights(self, arena: torch.Tensor, slot: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``slot``'s ``(A, B^T)`` read from its pages, in the compute ``dtype``."""
        mat = self.mats[slot]
        assert mat is not None
        a, bt = read_lora_weights(arena, mat, self.dtypes[slot] if self.dtypes else None)
        return a.to(dtype), bt.to(dtype)


def _groups(args: LoraArgs, arena: torch.Tensor, x: torch.Tensor):
    """Yield ``(rows, mat, A, B^T)`` per slot that has tokens and this module (weights in x's dtype)."""
    for slot, rows in args.segments.row_groups(x.device).items():
        mat = args.mats[slot]
        if mat is not None:
            yield (rows, mat, *args.weights(arena, slot, x.dtype))


def lora_shrink_ref(x: torch.Tensor, arena: torch.Tensor, args: LoraArgs) -> torch.Tensor:
    """``x [T, K] -> v [T, R]`` with ``v[t, :r_a] = x[t] @ A_a.T``, zeros elsewhere; ``R = args.max_rank``.

    ``arena [num_pages, page_elems]`` holds the pages; one matmul per slot, at that slot's rank.
    """
    v = x.new_zeros(x.shape[0], args.max_rank)
    for rows, mat, a, _ in _groups(args, arena, x):
        if isinstance(rows, slice):
            v[rows, : mat.rank] = x[rows] @ a.T
        else:
            v[rows, : mat.rank] = x.index_select(0, rows) @ a.T
    return v


def lora_expand_ref(v: torch.Tensor, arena: torch.Tensor, args: LoraArgs, y: torch.Tensor) -> None:
    """``y[t] += scale_a * v[t, :r_a] @ B_a.T`` in place for ``v [T, R]``, ``y [T, N]`` (any strides)."""
    for rows, mat, _, bt in _groups(args, arena, v):
        vr = v[rows] if isinstance(rows, slice) else v.index_select(0, rows)
        _add_rows(y, rows, vr[:, : mat.rank], bt, mat.scale)


def _add_rows(y: torch.Tensor, rows: Rows, v: torch.Tensor, bt: torch.Tensor, scale: float) -> None:
    """``y[rows] += scale * v @ bt``; ``v``/``bt`` may be in a wider compute dtype than ``y``."""
    if isinstance(rows, slice) and v.dtype == y.dtype:
        y[rows].addmm_(v, bt, alpha=scale)
    elif isinstance(rows, slice):
        y[rows].add_(v @ bt, alpha=scale)
    else:
        y.index_add_(0, rows, (v @ bt).to(y.dtype), alpha=scale)


def lora_group_ref(arena: torch.Tensor, segments: LoraSegments, adapters: Sequence[AdapterPageTable],
                   layer: int, group: LoraGroup, x: torch.Tensor, y: torch.Tensor) -> None:
    """``y[t, cols_m] += scale_a * (x[t] @ A_a.T) @ B_a.T`` for each module ``m`` of ``group``, where
    ``a`` is token ``t``'s adapter (``adapters[slot]``) and ``(A_a, B_a)`` its (layer, m) weights.

    ``x [T, group.in_features]``; ``y [T, group.out_features]`` (any strides), module ``m`` writing
    columns ``group.cols[m] : group.cols[m] + group.widths[m]``. Tokens without an adapter, or whose
    adapter lacks (layer, m), get nothing in those columns.
    """
    for module, col, width in zip(group.modules, group.cols, group.widths, strict=True):
        mats = tuple(a.modules.get((layer, module)) for a in adapters)
        if any(m is not None for m in mats):
            args = LoraArgs(segments, mats, tuple(a.dtype for a in adapters))
            lora_expand_ref(lora_shrink_ref(x, arena, args), arena, args, y[:, col : col + width])
