"""The one tensor boundary: a SchedulerOutput (plain data) becomes the tensors of one step.

Everything the forward reads (token ids, positions, slot mapping, block tables, sequence lengths,
sample rows, and whatever the LoRA backend's kernels need) is built here on the host with numpy,
packed into one int32 buffer and uploaded with one copy (kernels/step_buffer.py); the forward gets
views of that buffer and creates no tensor from Python data. Chunks are ordered by adapter so that
each adapter's tokens form one contiguous LoRA segment (the order of rows within a step has no
effect on results).

Block tables are kept across steps as numpy arrays per request (``BlockTables``): a running
request's table only grows by appended blocks, so each step copies only its new columns instead of
converting ``num_layers`` nested lists per request again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kernels.attention import AttnMeta
from kernels.lora import LoraSegments
from kernels.lora_backend import LoraBackend, LoraStep
from kernels.step_buffer import StepBuffer, StepPack
from server.model_config import LM_HEAD, MODEL_LAYER
from server.page_layout import AdapterPageTable, PageLayout
from server.scheduler import ScheduledChunk, SchedulerOutput


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T] int32
    positions: torch.Tensor  # [T] int32
    attn: AttnMeta
    lora: LoraStep | None
    sample_rows: torch.Tensor  # [S_sample] int32: the last row of each chunk that samples
    sample_request_ids: list[str]  # request id of each sample row, in order
    vocab: int = 0  # the widest lm_head of the step's adapters (added tokens), 0 if none has one


def _adapter_key(c: ScheduledChunk) -> int:
    return -1 if c.adapter_uid is None else c.adapter_uid


def _bucket(n: int) -> int:
    """Round a padded dimension up to a power of two: fewer distinct shapes for the kernels."""
    return 1 << max(n - 1, 0).bit_length()


class BlockTables:
    """Each scheduled request's block table as an int32 array ``[num_layers, capacity]``, kept across
    steps. A request's ``block_table`` (``[layer][block]`` lists) is append-only while it runs; it
    is replaced by a new list object when freed (finish, preemption) or re-attached to a cached
    prefix, so the identity of that object says whether the cached array is still its prefix."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._tables: dict[str, tuple[list[list[int]], np.ndarray, int]] = {}

    def step(self, chunks: list[ScheduledChunk]) -> list[np.ndarray]:
        """The current table of every chunk's request (views ``[num_layers, num_blocks]``); forgets
        requests that are not in this step."""
        tables, out = {}, []
        for c in chunks:
            src, n = c.block_table, len(c.block_table[0])
            hit = self._tables.get(c.request_id)
            if hit is None or hit[0] is not src or hit[2] > n:
                hit = (src, np.zeros((self.num_layers, _bucket(max(n, 1))), dtype=np.int32), 0)
            _, arr, have = hit
            if n > arr.shape[1]:
                grown = np.zeros((self.num_layers, _bucket(n)), dtype=np.int32)
                grown[:, :have] = arr[:, :have]
                arr = grown
            if n > have:
                arr[:, have:n] = [layer[have:n] for layer in src]
            tables[c.request_id] = (src, arr, n)
            out.append(arr[:, :n])
        self._tables = tables
        return out


def build_step(out: SchedulerOutput, layout: PageLayout, buffer: StepBuffer, lora: LoraBackend,
               page_table: Callable[[int], AdapterPageTable], tables: BlockTables | None = None) -> StepBatch:
    """The tensors of one step (``tables``: the runner's block tables kept across steps)."""
    chunks = sorted(out.chunks, key=_adapter_key)
    q_lens = np.array([len(c.token_ids) for c in chunks], dtype=np.int64)
    starts = np.array([c.start_pos for c in chunks], dtype=np.int64)
    cu = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    num_tokens = int(cu[-1])
    seq_of_row = np.repeat(np.arange(len(chunks)), q_lens)
    positions = starts[seq_of_row] + np.arange(num_tokens) - cu[:-1][seq_of_row]
    ctx = starts + q_lens
    per_chunk = (tables or BlockTables(layout.num_layers)).step(chunks)
    max_blocks = _bucket(max(t.shape[1] for t in per_chunk))
    block_tables = np.zeros((layout.num_layers, len(chunks), max_blocks), dtype=np.int32)
    for s, t in enumerate(per_chunk):
        block_tables[:, s, : t.shape[1]] = t
    bs = layout.block_size
    slot_mapping = block_tables[:, seq_of_row, positions // bs] * bs + (positions % bs).astype(np.int32)
    sampling = [(int(cu[s + 1]) - 1, c.request_id) for s, c in enumerate(chunks) if c.sample]

    pack = StepPack()
    pack.add("input_ids", np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks),
                                      dtype=np.int32, count=num_tokens))
    pack.add("positions", positions)
    pack.add("slot_mapping", slot_mapping)
    pack.add("block_tables", block_tables)
    pack.add("cu_q_lens", cu)
    pack.add("ctx_lens", ctx)
    pack.add("sample_rows", [r for r, _ in sampling])
    lora_step, vocab = _lora_step(chunks, cu, lora, page_table, pack)
    views = buffer.upload(pack)
    if lora_step is not None:
        lora_step.bind(views)
    attn = AttnMeta(block_tables=views["block_tables"], slot_mapping=views["slot_mapping"],
                    cu_q_lens=views["cu_q_lens"], ctx_lens=views["ctx_lens"], max_q_len=int(q_lens.max()),
                    max_ctx_len=int(ctx.max()), host_cu_q_lens=tuple(cu.tolist()),
                    host_ctx_lens=tuple(ctx.tolist()))
    return StepBatch(input_ids=views["input_ids"], positions=views["positions"], attn=attn, lora=lora_step,
                     sample_rows=views["sample_rows"], sample_request_ids=[rid for _, rid in sampling],
                     vocab=vocab)


def _lora_step(chunks: list[ScheduledChunk], cu: np.ndarray, lora: LoraBackend,
               page_table: Callable[[int], AdapterPageTable], pack: StepPack) -> tuple[LoraStep | None, int]:
    """One segment per run of chunks sharing an adapter (they are sorted by adapter); the same over
    the sample rows (one per chunk that samples, in chunk order) for the lm_head site. Also the
    widest lm_head of the step's adapters (0 if none has one)."""
    if all(c.adapter_uid is None for c in chunks):
        return None, 0
    seg_starts, seg_slots = [0], []
    sample_starts, sample_slots = [0], []
    tables: list[AdapterPageTable] = []
    slot_of: dict[int, int] = {}
    for s, c in enumerate(chunks):
        uid = c.adapter_uid
        slot = -1 if uid is None else slot_of.setdefault(uid, len(slot_of))
        if uid is not None and slot == len(tables):
            tables.append(page_table(uid))
        _extend(seg_starts, seg_slots, slot, int(cu[s + 1]))
        if c.sample:
            _extend(sample_starts, sample_slots, slot, sample_starts[-1] + 1)
    samples = LoraSegments(tuple(sample_starts), tuple(sample_slots)) if sample_slots else None
    vocab = max((t.modules[(MODEL_LAYER, LM_HEAD)].out_features for t in tables
                 if (MODEL_LAYER, LM_HEAD) in t.modules), default=0)
    return lora.prepare_step(LoraSegments(tuple(seg_starts), tuple(seg_slots)), tables, pack, samples), vocab


def _extend(starts: list[int], slots: list[int], slot: int, end: int) -> None:
    """Rows up to ``end`` belong to ``slot``: grow the last segment if it has that slot."""
    if slots and slots[-1] == slot:
        starts[-1] = end
    else:
        slots.append(slot)
        starts.append(end)
