"""Shared builders for the LoRA kernel tests: adapters written into a small paged arena.

The oracle is a dense float64 computation from the original ``A``, ``B`` and DoRA scale ``g``
(rounded to the arena dtype first, so the comparison measures the ops' arithmetic, not storage
rounding). Besides the layer modules, adapters have the model-wide sites: embed_tokens (a gather
over a vocabulary of ``VOCAB``, ``A`` stored transposed) and lm_head (``VOCAB`` outputs: its B^T and
g rows are longer than a page, so they are stored in pieces).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kernels.lora import LoraArgs, LoraSegments
from kernels.lora_pages import write_matrix_rows
from server.model_config import GATHER, SAMPLES, LoraGroup
from server.page_layout import AdapterPageTable, LoraMatrixPages, PageLayout

# 128-element pages: rows of 32 fit 4 per page, rows of 48 fit 2 (with a 32-element unused tail).
LAYOUT = PageLayout(page_elems=128, block_size=4, num_layers=2, num_kv_heads=2, head_dim=8)


class PageAlloc:
    """Hands out page ids in shuffled order so a matrix's pages are neither sorted nor adjacent."""

    def __init__(self, num_pages: int, seed: int = 0) -> None:
        self.free = list(range(num_pages))
        random.Random(seed).shuffle(self.free)

    def take(self, n: int) -> tuple[int, ...]:
        taken, self.free = self.free[:n], self.free[n:]
        return tuple(taken)


@dataclass
class Dense:
    a: torch.Tensor  # [r, K]
    b: torch.Tensor  # [N, r]
    scale: float
    g: torch.Tensor | None = None  # [N]: DoRA's scale
    replace: bool = False  # a full copy: its term replaces the base output


def add_matrix(
    arena: torch.Tensor, alloc: PageAlloc, rank: int, k: int, n: int, gen: torch.Generator,
    dora: bool = False, gather: bool = False, replace: bool = False,
) -> tuple[LoraMatrixPages, Dense]:  # fmt: skip
    """Random ``A [rank, k]``, ``B [n, rank]`` (and DoRA ``g [n]`` in 0.5..1.5) written into fresh
    pages; outputs are O(1) for unit x (one-hot x for ``gather``: then ``A`` is stored transposed);
    ``replace``: a full copy of the module (its term replaces the base output)."""
    a = (torch.randn(rank, k, generator=gen) / (1 if gather else k**0.5)).to(arena.dtype)
    b = (torch.randn(n, rank, generator=gen) / rank**0.5).to(arena.dtype)
    scale = 0.5 + torch.rand(1, generator=gen).item()
    g = (0.5 + torch.rand(n, generator=gen)).to(arena.dtype) if dora else None
    a_rows = a.T if gather else a
    a_pages = alloc.take(LAYOUT.pages_for_rows(*a_rows.shape))
    b_pages = alloc.take(LAYOUT.pages_for_rows(rank, n))
    g_pages = alloc.take(LAYOUT.pages_for_rows(1, n)) if dora else ()
    write_matrix_rows(arena, a_pages, a_rows)
    write_matrix_rows(arena, b_pages, b.T)
    if g is not None:
        write_matrix_rows(arena, g_pages, g.view(1, n))
    mat = LoraMatrixPages(rank, scale, k, n, a_pages, b_pages, g_pages, a_transposed=gather, replace=replace)
    return mat, Dense(a, b, scale, g, replace)


def build_args(
    ranks: list[int | None], seg_lens: list[int], seg_slots: list[int], k: int, n: int,
    dtype: torch.dtype, seed: int = 0,
) -> tuple[torch.Tensor, LoraArgs, list[Dense | None]]:  # fmt: skip
    """Arena + args for one call; ``ranks[slot] is None`` means that slot's adapter lacks the module."""
    gen = torch.Generator().manual_seed(seed)
    alloc = PageAlloc(2048, seed)
    arena = torch.randn(2048, LAYOUT.page_elems, generator=gen).to(dtype)  # garbage outside our rows
    mats: list[LoraMatrixPages | None] = []
    dense: list[Dense | None] = []
    for r in ranks:
        mat, d = add_matrix(arena, alloc, r, k, n, gen) if r is not None else (None, None)
        mats.append(mat)
        dense.append(d)
    starts = [0]
    for length in seg_lens:
        starts.append(starts[-1] + length)
    return arena, LoraArgs(LoraSegments(tuple(starts), tuple(seg_slots)), tuple(mats)), dense


def token_slots(args: LoraArgs) -> list[int]:
    seg = args.segments
    out: list[int] = []
    for s, slot in enumerate(seg.seg_slots):
        out += [slot] * (seg.seg_starts[s + 1] - seg.seg_starts[s])
    return out


def dense_shrink(x: torch.Tensor, args: LoraArgs, dense: list[Dense | None]) -> torch.Tensor:
    v = torch.zeros(x.shape[0], args.max_rank, dtype=torch.float64)
    for t, slot in enumerate(token_slots(args)):
        d = dense[slot] if slot >= 0 else None
        if d is not None:
            v[t, : d.a.shape[0]] = x[t].double() @ d.a.double().T
    return v


def dense_delta(x: torch.Tensor, args: LoraArgs, dense: list[Dense | None]) -> torch.Tensor:
    """The LoRA term ``scale_a * (x[t] @ A_a.T) @ B_a.T`` per token, in float64."""
    v = dense_shrink(x, args, dense)
    n = next(d.b.shape[0] for d in dense if d is not None)
    out = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for t, slot in enumerate(token_slots(args)):
        d = dense[slot] if slot >= 0 else None
        if d is not None:
            out[t] = d.scale * v[t, : d.a.shape[0]] @ d.b.double().T
    return out


# Mixed ranks in one call, with one slot lacking the module (None); skewed segments: a 150-token
# prefill, decode singletons, empty segments, no-adapter segments, unsorted and repeated slots.
RANKS: list[int | None] = [64, 1, 128, 8, 16, None]
SEG_LENS = [3, 0, 150, 1, 1, 2, 0, 5, 1, 4, 2, 1]
SEG_SLOTS = [2, 0, 0, -1, 4, 1, 3, 2, 5, -1, 3, 1]


# Per-module (in, out) of a small model, and its module groups as the forward uses them.
SHAPES = {
    "q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
    "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32),
}  # fmt: skip
VOCAB = 300  # > page_elems: lm_head's B^T and g rows are stored in 3 pieces
ADDED = 20  # tokens a full-copy adapter adds to the vocabulary
ALL_SHAPES = {**SHAPES, "embed_tokens": (VOCAB, 32), "lm_head": (32, VOCAB)}
COPY_SHAPES = {"embed_tokens": (VOCAB + ADDED, 32), "lm_head": (32, VOCAB + ADDED)}
GROUPS = (
    LoraGroup("qkv", ("q_proj", "k_proj", "v_proj"), 32, (32, 16, 16)),
    LoraGroup("o", ("o_proj",), 32, (32,)),
    LoraGroup("gate_up", ("gate_proj", "up_proj"), 32, (48, 48)),
    LoraGroup("down", ("down_proj",), 48, (32,)),
)
MODEL_GROUPS = (LoraGroup("embed_tokens", ("embed_tokens",), VOCAB + ADDED, (32,), GATHER),
                LoraGroup("lm_head", ("lm_head",), 32, (VOCAB + ADDED,), SAMPLES))


def model_adapters(arena: torch.Tensor, seed: int = 7) -> tuple[list[AdapterPageTable], list[dict]]:
    """Three adapters written into ``arena`` (>= 1024 pages): every module at rank 16, embed_tokens at
    rank 8 and a full copy of lm_head (ADDED more tokens); q/k/v of layer 0 only at rank 4 and
    lm_head at rank 16, all DoRA; per-module ranks 1..128 on gate, up, q and down, a full copy of
    embed_tokens (ADDED more tokens) and lm_head at rank 5. Returns the page tables and, per
    adapter, ``{(layer, module): Dense}``."""
    gen = torch.Generator().manual_seed(seed)
    alloc = PageAlloc(arena.shape[0], seed=seed)
    plans = [
        {**{(layer, m): (16, "lora") for layer in (0, 1) for m in SHAPES}, (0, "embed_tokens"): (8, "lora"),
         (0, "lm_head"): (32, "copy")},
        {**{(0, m): (4, "dora") for m in ("q_proj", "k_proj", "v_proj")}, (0, "lm_head"): (16, "dora")},
        {**{(layer, m): (r, "lora") for layer in (0, 1)
            for m, r in (("gate_proj", 1), ("up_proj", 32), ("q_proj", 8), ("down_proj", 128))},
         (0, "embed_tokens"): (32, "copy"), (0, "lm_head"): (5, "lora")},
    ]
    tables, dense = [], []
    for uid, plan in enumerate(plans, start=100):
        mods, dens = {}, {}
        for (layer, m), (rank, kind) in plan.items():
            k, n = (COPY_SHAPES if kind == "copy" else ALL_SHAPES)[m]
            mods[(layer, m)], dens[(layer, m)] = add_matrix(
                arena, alloc, rank, k, n, gen, dora=kind == "dora", gather=m == "embed_tokens",
                replace=kind == "copy")
        tables.append(AdapterPageTable(uid, mods))
        dense.append(dens)
    return tables, dense


def group_cases() -> list[tuple[int, LoraGroup]]:
    """Every (layer, group) a step applies: the layer groups of both layers, the model-wide ones once."""
    return [(layer, g) for layer in (0, 1) for g in GROUPS] + [(0, g) for g in MODEL_GROUPS]


def group_input(group: LoraGroup, t: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``x`` for one call: activations ``[t, in_features]``, or int32 token ids for a gather."""
    if group.kind == GATHER:  # token ids every adapter has
        return torch.randint(0, VOCAB, (t,), generator=gen, dtype=torch.int32)
    return torch.randn(t, group.in_features, generator=gen).to(dtype)


def dense_group(x: torch.Tensor, y0: torch.Tensor, seg_starts: list[int], seg_slots: list[int],
                dense: list[dict], layer: int, group: LoraGroup) -> torch.Tensor:
    """``y0`` plus the group's LoRA terms (DoRA: then times g), in float64, from the original A, B, g.
    A ``GATHER`` group's ``x`` holds token ids (one-hot rows)."""
    out = y0.double().clone()
    for s, slot in enumerate(seg_slots):
        for t in range(seg_starts[s], seg_starts[s + 1]):
            for m, col in zip(group.modules, group.cols, strict=True):
                d = dense[slot].get((layer, m)) if slot >= 0 else None
                if d is None:
                    continue
                v = d.a.double()[:, int(x[t])] if group.kind == GATHER else x[t].double() @ d.a.double().T
                n = d.b.shape[0]  # <= width: a module writes its out_features columns
                term = d.scale * v @ d.b.double().T
                out[t, col : col + n] = term if d.replace else out[t, col : col + n] + term
                if d.g is not None:
                    out[t, col : col + n] *= d.g.double()
    return out
