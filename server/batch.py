"""The one tensor boundary: a SchedulerOutput (plain data) becomes the tensors of one step.

Chunks are ordered by adapter so that each adapter's tokens form one contiguous LoRA segment (the
order of rows within a step has no effect on results). Nothing else in the server turns
bookkeeping into tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.attention import AttnMeta
from kernels.lora import GatherCache, LoraBatch
from server.page_layout import AdapterPageTable, PageLayout
from server.scheduler import ScheduledChunk, SchedulerOutput


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttnMeta
    lora: LoraBatch | None
    sample_rows: torch.Tensor  # [S_sample] int64: the last row of each chunk that samples
    sample_request_ids: list[str]  # request id of each sample row, in order


def _adapter_key(c: ScheduledChunk) -> int:
    return -1 if c.adapter_uid is None else c.adapter_uid


def build_step(out: SchedulerOutput, layout: PageLayout, arena: torch.Tensor,
               page_table: Callable[[int], AdapterPageTable], lora_backend: str,
               lora_cache: GatherCache) -> StepBatch:
    chunks = sorted(out.chunks, key=_adapter_key)
    device = arena.device
    ids: list[int] = []
    pos: list[int] = []
    seq_of_row: list[int] = []
    cu = [0]
    ctx = []
    for s, c in enumerate(chunks):
        n = len(c.token_ids)
        ids.extend(c.token_ids)
        pos.extend(range(c.start_pos, c.start_pos + n))
        seq_of_row.extend([s] * n)
        cu.append(cu[-1] + n)
        ctx.append(c.start_pos + n)
    max_blocks = max(len(c.block_table[0]) for c in chunks)
    tables = [[row + [0] * (max_blocks - len(row)) for row in c.block_table] for c in chunks]
    block_tables = torch.tensor(tables, dtype=torch.int32).transpose(0, 1).contiguous()  # [L, S, B]
    positions = torch.tensor(pos, dtype=torch.int64)
    rows = torch.tensor(seq_of_row, dtype=torch.int64)
    pages = block_tables[:, rows, positions // layout.block_size].long()  # [L, T]
    slot_mapping = pages * layout.block_size + positions % layout.block_size
    attn = AttnMeta(
        block_tables=block_tables.to(device),
        slot_mapping=slot_mapping.to(device),
        cu_q_lens=torch.tensor(cu, dtype=torch.int32, device=device),
        ctx_lens=torch.tensor(ctx, dtype=torch.int32, device=device),
        max_q_len=max(len(c.token_ids) for c in chunks),
        max_ctx_len=max(ctx),
    )
    sampling = [(cu[s + 1] - 1, c.request_id) for s, c in enumerate(chunks) if c.sample]
    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=positions.to(device),
        attn=attn,
        lora=_lora_batch(chunks, cu, layout, arena, page_table, lora_backend, lora_cache),
        sample_rows=torch.tensor([r for r, _ in sampling], dtype=torch.int64, device=device),
        sample_request_ids=[rid for _, rid in sampling],
    )


def _lora_batch(chunks: list[ScheduledChunk], cu: list[int], layout: PageLayout, arena: torch.Tensor,
                page_table: Callable[[int], AdapterPageTable], backend: str,
                cache: GatherCache) -> LoraBatch | None:
    """One segment per run of chunks sharing an adapter (they are sorted by adapter)."""
    if all(c.adapter_uid is None for c in chunks):
        return None
    seg_starts = [0]
    seg_slots: list[int] = []
    tables: list[AdapterPageTable] = []
    slot_of: dict[int, int] = {}
    for s, c in enumerate(chunks):
        uid = c.adapter_uid
        slot = -1 if uid is None else slot_of.setdefault(uid, len(slot_of))
        if uid is not None and slot == len(tables):
            tables.append(page_table(uid))
        if seg_slots and seg_slots[-1] == slot:
            seg_starts[-1] = cu[s + 1]
        else:
            seg_slots.append(slot)
            seg_starts.append(cu[s + 1])
    return LoraBatch(arena, layout, seg_starts, seg_slots, tables, backend=backend, cache=cache)
