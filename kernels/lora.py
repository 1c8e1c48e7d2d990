"""Batched multi-adapter LoRA over the paged arena: torch reference ops and the per-step ``LoraBatch``.

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

The torch path is production on CPU, so ``LoraBatch`` keeps contiguous copies of the pages it reads
(``GatherCache``, keyed by adapter uid) across steps and does one shrink and one expand matmul per
(adapter, module) instead of per token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kernels.lora_cpu import GatherCache, apply_fused
from kernels.lora_native import NATIVE_DTYPES, NativeStep
from kernels.lora_native import available as native_available
from kernels.lora_pages import read_lora_weights, read_matrix_rows, write_matrix_rows
from server.page_layout import AdapterPageTable, LoraMatrixPages, PageLayout

__all__ = ["GatherCache", "LoraArgs", "LoraBatch", "LoraSegments", "lora_expand_ref", "lora_shrink_ref",
           "read_lora_weights", "read_matrix_rows", "write_matrix_rows"]

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

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
    """One shrink/expand call: the step's segments and, per slot, that module's pages (or None)."""

    segments: LoraSegments
    mats: tuple[LoraMatrixPages | None, ...]  # indexed by slot
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


WeightFn = Callable[[int, LoraMatrixPages], tuple[torch.Tensor, torch.Tensor]]
RunFn = Callable[[LoraArgs, tuple[int, str], torch.Tensor, torch.Tensor], None]


def _groups(args: LoraArgs, device: torch.device, weights: WeightFn):
    """Yield ``(rows, mat, A, B^T)`` per slot that has tokens and this module."""
    for slot, rows in args.segments.row_groups(device).items():
        mat = args.mats[slot]
        if mat is not None:
            yield (rows, mat, *weights(slot, mat))


def lora_shrink_ref(x: torch.Tensor, arena: torch.Tensor, args: LoraArgs) -> torch.Tensor:
    """``x [T, K] -> v [T, R]`` with ``v[t, :r_a] = x[t] @ A_a.T``, zeros elsewhere; ``R = args.max_rank``.

    ``arena [num_pages, page_elems]`` holds the pages; one matmul per slot, at that slot's rank.
    """
    v = x.new_zeros(x.shape[0], args.max_rank)
    for rows, mat, a, _ in _groups(args, x.device, lambda _, m: read_lora_weights(arena, m)):
        if isinstance(rows, slice):
            v[rows, : mat.rank] = x[rows] @ a.T
        else:
            v[rows, : mat.rank] = x.index_select(0, rows) @ a.T
    return v


def lora_expand_ref(v: torch.Tensor, arena: torch.Tensor, args: LoraArgs, y: torch.Tensor) -> None:
    """``y[t] += scale_a * v[t, :r_a] @ B_a.T`` in place for ``v [T, R]``, ``y [T, N]`` (any strides)."""
    for rows, mat, _, bt in _groups(args, v.device, lambda _, m: read_lora_weights(arena, m)):
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


class LoraBatch:
    """The LoRA term of one engine step, as the model sees it; built once per step, plain data in.

    ``seg_slots[s]`` indexes ``adapters`` (``-1``: no adapter). ``backend`` is ``"torch"`` (CPU
    production path and reference semantics) or ``"triton"`` (reads pages in place). Pass the
    runner's long-lived ``cache`` so the torch path reuses gathered weights across steps; without one
    the batch gathers each (adapter, layer, module) once for this step.
    """

    def __init__(
        self,
        arena: torch.Tensor,
        layout: PageLayout,
        seg_starts: Sequence[int],
        seg_slots: Sequence[int],
        adapters: Sequence[AdapterPageTable],
        backend: str = "torch",
        cache: GatherCache | None = None,
    ) -> None:
        if arena.dim() != 2 or arena.shape[1] != layout.page_elems:
            raise ValueError(f"arena must be [num_pages, {layout.page_elems}], got {tuple(arena.shape)}")
        self.arena = arena
        self.segments = LoraSegments(tuple(seg_starts), tuple(seg_slots))
        self.adapters = tuple(adapters)
        self.cache = cache if cache is not None else GatherCache()
        self._args: dict[tuple[int, str], LoraArgs | None] = {}
        self.active = self.segments.has_adapter_tokens
        self.backend = backend
        self._run = self._select(backend)
        self._native = None
        if backend == "native" and self.active:
            rows = [None if slot < 0 else self.cache.native_rows(self.adapters[slot], layout)
                    for slot in self.segments.seg_slots]
            self._native = NativeStep(self.segments.seg_starts, rows, layout.num_layers)

    @classmethod
    def empty(cls) -> LoraBatch:
        """A batch in which no token has an adapter: ``apply`` returns at once."""
        batch = cls.__new__(cls)
        batch.active = False
        return batch

    def _select(self, backend: str) -> RunFn:
        if backend == "torch":
            return self._run_torch
        if backend == "native":
            if self.arena.device.type != "cpu" or self.arena.dtype not in NATIVE_DTYPES:
                raise ValueError(f"the native LoRA kernel needs a CPU arena in {NATIVE_DTYPES}")
            if not native_available():
                raise ValueError("the native LoRA kernel could not be built (see the log)")

            def run_native(args: LoraArgs, key: tuple[int, str], x: torch.Tensor, y: torch.Tensor) -> None:
                self._native.apply_group(self.arena, key[0], (key[1],), x, y, (y.shape[1],))

            return run_native
        if backend == "triton":
            from kernels.triton_lora import lora_expand_triton, lora_shrink_triton

            def run(args: LoraArgs, key: tuple[int, str], x: torch.Tensor, y: torch.Tensor) -> None:
                lora_expand_triton(lora_shrink_triton(x, self.arena, args), self.arena, args, y)

            return run
        raise ValueError(f"unknown LoRA backend {backend!r}; expected 'torch', 'native' or 'triton'")

    def args_for(self, layer: int, module: str) -> LoraArgs | None:
        """This step's op arguments for (layer, module); None if no adapter in the batch targets it."""
        key = (layer, module)
        if key not in self._args:
            mats = tuple(a.modules.get(key) for a in self.adapters)
            self._args[key] = LoraArgs(self.segments, mats) if any(m is not None for m in mats) else None
        return self._args[key]

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y[t] += scale_a * (x[t] @ A_a.T) @ B_a.T`` for tokens whose adapter targets (layer, module).

        ``x [T, in]``, ``y [T, out]``; ``y`` may be a strided column slice of a fused output.
        """
        if not self.active:
            return
        args = self.args_for(layer, module)
        if args is not None:
            self._run(args, (layer, module), x, y)

    def apply_group(self, layer: int, modules: tuple[str, ...], x: torch.Tensor, y: torch.Tensor,
                    widths: tuple[int, ...]) -> None:
        """``apply`` for modules that share ``x``, whose outputs are consecutive column blocks of
        ``y`` of the given ``widths`` (fused q/k/v, gate/up). Same result; fewer ops on the torch path."""
        if not self.active:
            return
        if self._native is not None:
            self._native.apply_group(self.arena, layer, modules, x, y, widths)
            return
        if self.backend != "torch":
            col = 0
            for module, width in zip(modules, widths, strict=True):
                self.apply(layer, module, x, y[:, col : col + width])
                col += width
            return
        groups = [(rows, self.cache.get_fused(self.arena, self.adapters[slot], layer, modules, widths))
                  for slot, rows in self.segments.row_groups(x.device).items()]
        apply_fused(groups, x, y, self.cache.compute_dtype or self.arena.dtype)

    def _run_torch(self, args: LoraArgs, key: tuple[int, str], x: torch.Tensor, y: torch.Tensor) -> None:
        def weights(slot: int, mat: LoraMatrixPages) -> tuple[torch.Tensor, torch.Tensor]:
            return self.cache.get(self.arena, self.adapters[slot].uid, key, mat)

        for rows, mat, a, bt in _groups(args, x.device, weights):
            xr = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
            _add_rows(y, rows, xr.to(a.dtype) @ a.T, bt, mat.scale)
