"""Runs one engine step on the device: copy new adapters into pages, build tensors, forward, sample.

The runner owns the arena (the unified pool's memory) and everything derived from it: the LoRA
backend object (chosen once here; it owns its caches and writes adapters into the pages) and the
step buffer every step's metadata is uploaded through. It is the only component besides
``server/batch.py`` that touches tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels.backend import KernelBackend, select_lora_backend
from kernels.step_buffer import StepBuffer
from server.arena import PREFAULT_BYTES, zeroed_pages
from server.batch import BlockTables, build_step
from server.model import LlamaModel
from server.model_config import ModelConfig
from server.page_layout import AdapterPageTable, PageLayout
from server.sampling import Sampler, TokenLogprobs
from server.sampling_params import SamplingParams
from server.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from adapter_store.peft_format import LoraWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowContext:
    """What the runner needs per sampling request (looked up by request id)."""

    params: SamplingParams
    generator: torch.Generator | None
    banned: tuple[int, ...]


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprobs: TokenLogprobs | None


class ModelRunner:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], layout: PageLayout,
                 num_pages: int, backend: KernelBackend, max_positions: int, seed: int = 0,
                 lora_backend: str | None = None, prepack: bool = True) -> None:
        some = weights["model.embed_tokens.weight"]
        self.layout = layout
        self.backend = backend
        # The pool's memory: pages of bytes. KV blocks are read in the model dtype; an adapter's rows
        # in its storage dtype (a view of the same bytes; kernels/lora_pages.py storage_view).
        self.arena_bytes = zeroed_pages(num_pages, layout.page_bytes, some.device, PREFAULT_BYTES)
        self.arena = self.arena_bytes.view(some.dtype)
        if self.arena.shape[1] != layout.page_elems:
            raise ValueError(f"the layout's pages hold {layout.page_elems} elements of {layout.itemsize} "
                             f"bytes; the model dtype is {some.dtype}")
        self.kv_pages = self.arena.view(
            num_pages, 2, layout.block_size, layout.num_kv_heads, layout.head_dim
        )
        self.lora = select_lora_backend(self.arena, layout, backend.name, lora_backend)
        self.step_buffer = StepBuffer(self.arena.device)
        self.block_tables = BlockTables(layout.num_layers)
        self.model = LlamaModel(config, weights, backend, max_positions, prepack=prepack)
        self.sampler = Sampler(seed)

    @property
    def device(self) -> torch.device:
        return self.arena.device

    def write_adapter(self, table: AdapterPageTable, weights: Mapping[tuple[int, str], LoraWeights]) -> None:
        """Copy an adapter's host tensors into its pages: A as rows, B transposed as rows."""
        self.lora.write_adapter(table, weights)

    def drop_adapter(self, uid: int) -> None:
        self.lora.drop_adapter(uid)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, page_table: Callable[[int], AdapterPageTable],
                rows: Callable[[str], RowContext]) -> dict[str, Sampled]:
        """Forward the scheduled chunks and sample for those that end at the last known token."""
        for uid in out.evicted_adapters:
            self.drop_adapter(uid)
        if not out.chunks:
            return {}
        step = build_step(out, self.layout, self.step_buffer, self.lora, page_table, self.block_tables)
        logits = self.model.forward(step.input_ids, step.positions, step.attn, self.kv_pages, step.lora,
                                    step.sample_rows, step.vocab)
        if not step.sample_request_ids:
            return {}
        ctx = [rows(rid) for rid in step.sample_request_ids]
        result = self.sampler.sample(
            logits, [c.params for c in ctx], [c.generator for c in ctx], [c.banned for c in ctx]
        )
        return {
            rid: Sampled(tok, lp)
            for rid, tok, lp in zip(step.sample_request_ids, result.token_ids, result.logprobs, strict=True)
        }
