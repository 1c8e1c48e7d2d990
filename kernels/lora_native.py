"""The native LoRA backend: one C call (kernels/lora_native.c) per layer and module group on CPU.

Why: a decode step with 64 adapters makes ~16,000 tiny per-adapter matmuls through torch, each
paying a fixed dispatch cost larger than its arithmetic; one C call per (layer, group) covers every
adapter of the step and reads the rows in place from the pages (no gathered copy).

Tables: per resident adapter, ``AdapterRows`` holds the byte offsets of every row of every (layer,
module) matrix in the arena and a descriptor per (layer, module): ``(rank, address of the A row
offsets, address of the B^T row offsets, scale, flags, address of the DoRA scale row's offsets or
0, output columns, replace)``, the C struct ``Desc``; the flags say whether the adapter's rows are
bf16 (an adapter stored in bf16 in an fp32 model: half the bytes to stream per step, widened to
fp32 as they are loaded). Built once when the adapter is first used (pure arithmetic on its page
table) and dropped when it is evicted. Per step, ``NativeStep`` stacks the descriptors of each
segment's adapter into ``[L, S, M, 8]`` (and of each sample segment, for the lm_head group), or
reuses the last step's stack when its segments had the same row tables in the same order (steady
decode: 64 adapters' stack is 1.1 MB to copy). Everything here is host memory: nothing to upload.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.lora import LoraSegments
from kernels.lora_backend import LoraBackend, LoraStep
from kernels.lora_pages import AdapterWeights, adapter_matrices, storage_dtype, storage_view
from kernels.native_lib import library
from kernels.page_rows import Placement, row_offsets, write_adapter_rows
from kernels.step_buffer import StepPack
from server.model_config import GATHER, KERNEL_MODULES, SAMPLES, LoraGroup
from server.page_layout import AdapterPageTable, PageLayout, stored_shape

MODULE_INDEX = {m: i for i, m in enumerate(KERNEL_MODULES)}  # a descriptor's index on its module axis
MODULES = len(KERNEL_MODULES)
NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # of the arena, x and y, and of adapters' rows
# rank, a_rows address, b_rows address, scale (float64 bits), flags, g_rows address (or 0), out, replace
DESC_FIELDS = 8
WEIGHTS_BF16 = 1  # flags: the adapter's rows are bf16


class AdapterRows:
    """One adapter's row offsets and descriptors ``[num_layers, len(KERNEL_MODULES), DESC_FIELDS]``."""

    def __init__(self, table: AdapterPageTable, num_layers: int, arena: torch.Tensor) -> None:
        view = storage_view(arena, table.dtype)
        elems = view.shape[1]
        places: list[Placement] = []
        spans: dict[tuple[int, str], tuple[int, int, int]] = {}  # first row of A, B^T and g (or -1)
        total = 0
        for key, mat in table.modules.items():
            starts = []
            g_shape = (1, mat.out_features) if mat.dora else None
            for pages, row0, shape in ((mat.a_pages, mat.a_row0, mat.a_shape),
                                       (mat.b_pages, mat.b_row0, (mat.rank, mat.out_features)),
                                       (mat.g_pages, mat.g_row0, g_shape)):
                starts.append(total if shape else -1)
                if shape:
                    places.append((pages, row0, *stored_shape(*shape, elems)))
                    total += places[-1][2]
            spans[key] = tuple(starts)
        offsets = row_offsets(places, elems, view.element_size())
        self.rows = offsets if len(offsets) else torch.zeros(1, dtype=torch.int64)
        self.modules = frozenset(m for _, m in table.modules)  # in some layer (or model-wide)
        base, size = self.rows.data_ptr(), self.rows.element_size()
        flags = WEIGHTS_BF16 if view.dtype == torch.bfloat16 else 0
        desc = torch.zeros(num_layers, MODULES, DESC_FIELDS, dtype=torch.int64)
        layers, mods, fields, scales = [], [], [], []  # one indexed write, not one per module
        for (layer, module), (first_a, first_b, first_g) in spans.items():
            mat = table.modules[(layer, module)]
            g_rows = base + first_g * size if first_g >= 0 else 0
            layers.append(layer)
            mods.append(MODULE_INDEX[module])
            fields.append([mat.rank, base + first_a * size, base + first_b * size, 0, flags, g_rows,
                           mat.out_features, int(mat.replace)])
            scales.append(mat.scale)
        if fields:
            rows = torch.tensor(fields, dtype=torch.int64)
            rows[:, 3] = torch.tensor(scales, dtype=torch.float64).view(torch.int64)  # the double's bits
            desc[torch.tensor(layers), torch.tensor(mods)] = rows
        self.desc = desc


class _Rows:
    """One set of a step's rows (its tokens, or its sample rows): segments and stacked descriptors
    ``[num_layers, num_segments, len(KERNEL_MODULES), DESC_FIELDS]``. ``modules``: those some
    segment's adapter has, so that a group none of them has costs no kernel call (q,k,v,o adapters:
    half a step's 120 calls)."""

    def __init__(self, num_layers: int, seg_starts: tuple[int, ...], rows: list[AdapterRows | None],
                 reuse: _Rows | None = None) -> None:
        self.keep = rows  # the row tables the descriptors point into stay alive with the step
        if reuse is not None and len(reuse.keep) == len(rows) and all(
                a is b for a, b in zip(reuse.keep, rows, strict=True)):
            self.desc = reuse.desc  # steady decode: the same adapters in the same order as last step
        else:
            none = torch.zeros(num_layers, MODULES, DESC_FIELDS, dtype=torch.int64)
            self.desc = torch.stack([none if r is None else r.desc for r in rows], dim=1).contiguous()
        self.seg_starts = torch.tensor(seg_starts, dtype=torch.int64)
        self.num_segments = len(rows)
        self.num_tokens = seg_starts[-1]
        self.modules = frozenset().union(*(r.modules for r in rows if r is not None))


class NativeStep(LoraStep):
    """One step's rows: its tokens' segments and, for the lm_head group, its sample rows'."""

    def __init__(self, backend: NativeLoraBackend, tokens: _Rows, samples: _Rows | None) -> None:
        self.backend = backend
        self.tokens = tokens
        self.samples = samples

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y[t, cols_m] += scale * (x[t] @ A_m.T) @ B_m.T`` for each module of the group, every token
        (DoRA modules: then scaled by g; a gather group: ``x`` holds int32 token ids)."""
        rows = self.samples if group.kind == SAMPLES else self.tokens
        if rows is None or rows.modules.isdisjoint(group.modules):
            return
        arena, lib = self.backend.arena, self.backend.lib
        gather = group.kind == GATHER
        x_ok = x.dtype == torch.int32 and x.dim() == 1 if gather else x.dtype == arena.dtype
        if not x_ok or y.dtype != arena.dtype or x.stride(-1) != 1 or y.stride(1) != 1:
            raise ValueError("x and y need the arena's dtype (token ids: int32) and unit column stride")
        if x.shape[0] != rows.num_tokens or y.shape[0] != x.shape[0]:
            raise ValueError(f"x and y must have {rows.num_tokens} rows")
        mods, cols, wid = self.backend.group_arrays(group)
        per_layer = rows.num_segments * MODULES * DESC_FIELDS * 8
        rc = lib.lora_group(int(arena.dtype == torch.bfloat16), arena.data_ptr(), x.data_ptr(), x.stride(0),
                            y.data_ptr(), y.stride(0), group.in_features, rows.num_segments,
                            rows.seg_starts.data_ptr(), rows.desc.data_ptr() + layer * per_layer,
                            MODULES, len(group.modules), mods.data_ptr(), cols.data_ptr(),
                            wid.data_ptr(), torch.get_num_threads(), int(gather),
                            arena.shape[1] * arena.element_size())
        if rc != 0:
            raise MemoryError("CPU LoRA kernel: out of memory for its work buffers")


class NativeLoraBackend(LoraBackend):
    """The C kernel over a CPU arena (fp32 or bf16); needs ``kernels.native_lib.available()``."""

    name = "native"

    @property
    def storage_dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(dict.fromkeys((self.arena.dtype, torch.bfloat16)))

    def __init__(self, arena: torch.Tensor, layout: PageLayout) -> None:
        super().__init__(arena, layout)
        if arena.device.type != "cpu" or arena.dtype not in NATIVE_DTYPES or not arena.is_contiguous():
            raise ValueError(f"the native LoRA kernel needs a contiguous CPU arena in {NATIVE_DTYPES}")
        lib = library()
        if lib is None:
            raise ValueError("the native LoRA kernel could not be built (see the log)")
        self.lib = lib
        self._rows: dict[int, AdapterRows] = {}
        self._groups: dict[LoraGroup, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._last: dict[str, _Rows] = {}  # the last step's rows, "tokens" and "samples"

    def write_adapter(self, table: AdapterPageTable, weights: AdapterWeights) -> None:
        if storage_dtype(self.arena, table.dtype) not in NATIVE_DTYPES:
            raise ValueError(f"adapter rows in {table.dtype} are not readable by the native kernel")
        write_adapter_rows(storage_view(self.arena, table.dtype), adapter_matrices(table, weights))

    def drop_adapter(self, uid: int) -> None:
        self._rows.pop(uid, None)

    def adapter_rows(self, table: AdapterPageTable) -> AdapterRows:
        """The kernel's row offsets and descriptors of adapter ``table.uid`` (cached until dropped)."""
        hit = self._rows.get(table.uid)
        if hit is None:
            hit = self._rows[table.uid] = AdapterRows(table, self.layout.num_layers, self.arena)
        return hit

    def group_arrays(self, group: LoraGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel's (module indices, first columns, widths) of a group, made once per group."""
        hit = self._groups.get(group)
        if hit is None:
            hit = self._groups[group] = tuple(
                torch.tensor(v, dtype=torch.int64)
                for v in ([MODULE_INDEX[m] for m in group.modules], list(group.cols), list(group.widths)))
        return hit

    def prepare_step(self, segments: LoraSegments, adapters: Sequence[AdapterPageTable],
                     pack: StepPack, samples: LoraSegments | None = None) -> LoraStep:
        def rows(seg: LoraSegments, kind: str) -> _Rows:
            tables = [None if slot < 0 else self.adapter_rows(adapters[slot]) for slot in seg.seg_slots]
            out = _Rows(self.layout.num_layers, seg.seg_starts, tables, self._last.get(kind))
            self._last[kind] = out
            return out

        return NativeStep(self, rows(segments, "tokens"),
                          None if samples is None else rows(samples, "samples"))

    def __contains__(self, uid: int) -> bool:
        return uid in self._rows
