"""The LoRA backend interface: one object per runner, chosen once (``kernels.backend.select_lora_backend``).

Three implementations, each owning its caches and the way it writes adapters into the pages:

* ``TorchLoraBackend`` (kernels/lora_torch.py): torch ops, the reference semantics and the fallback
  on any device; on CPU it keeps gathered copies of the weights.
* ``NativeLoraBackend`` (kernels/lora_native.py): the CPU C kernel, reading rows in place.
* ``TritonLoraBackend`` (kernels/triton_lora.py): fused multi-adapter Triton kernels reading the
  pages in place, metadata uploaded once per step.

Per engine step the batch builder calls ``prepare_step`` once, before the forward: the backend
turns the step's segments and adapters into whatever its kernels read (adding int32 sections to
the step's ``StepPack`` if they must reach the device) and returns a ``LoraStep``. After the
pack is uploaded, ``LoraStep.bind`` receives the device views. The model then calls
``LoraStep.apply(layer, group, x, y)`` for each ``LoraGroup`` of each layer, and nothing else:
no backend name, no per-call dispatch, no tensor made from Python data inside the forward.

Semantics of ``apply`` (the specification is ``kernels.lora.lora_group_ref``)::

    y[t, cols_m] += scale_a * (x[t] @ A_a.T) @ B_a.T     for each module m of the group,

where ``a`` is token ``t``'s adapter and ``(A_a, B_a, scale_a)`` its weights for (layer, m); tokens
without an adapter, or whose adapter lacks (layer, m), get nothing. ``x [T, group.in_features]``;
``y [T, group.out_features]`` may be a strided view (a fused projection's output). Per module, a
DoRA adapter's epilogue then scales the row by its ``g``: ``y[t, cols_m] = g_a * (y + ...)``
(``y`` holds the base layer's output when ``apply`` is called).

The model-wide sites are groups too (``ModelConfig.model_groups``): embed_tokens (``group.kind ==
GATHER``: ``x`` holds the step's token ids, the shrink is a row lookup of ``A.T``) and lm_head
(``SAMPLES``: ``x`` and ``y`` hold the sample rows, whose adapters are ``prepare_step``'s ``samples``
segments). DoRA is one more field of each backend's per-(adapter, layer, module) descriptor, a new
site a new group and module index: neither adds a branch at the call sites.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

from kernels.lora import LoraSegments
from kernels.lora_pages import AdapterWeights
from kernels.step_buffer import StepPack
from server.model_config import LoraGroup
from server.page_layout import AdapterPageTable, PageLayout


class LoraStep(ABC):
    """The LoRA term of one engine step, as the model sees it."""

    def bind(self, views: Mapping[str, torch.Tensor]) -> None:  # noqa: B027 (optional hook)
        """Receive the device views of the sections ``prepare_step`` added (after the upload)."""

    @abstractmethod
    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y[t, cols_m] += scale_a * (x[t] @ A_a.T) @ B_a.T`` for each module ``m`` of ``group``."""


class NoLoraStep(LoraStep):
    """A step in which no token has an adapter."""

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, y: torch.Tensor) -> None:
        return None


NO_LORA = NoLoraStep()


class LoraBackend(ABC):
    """One LoRA implementation over the runner's arena."""

    name: str

    def __init__(self, arena: torch.Tensor, layout: PageLayout) -> None:
        if arena.dim() != 2 or arena.shape[1] != layout.page_elems:
            raise ValueError(f"arena must be [num_pages, {layout.page_elems}], got {tuple(arena.shape)}")
        self.arena = arena
        self.layout = layout

    @property
    def storage_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtypes of adapter rows its kernels read (the arena's own first). A backend that can
        read bf16 rows in an fp32 arena lets bf16 adapters be stored as they are: half the bytes."""
        return (self.arena.dtype,)

    @abstractmethod
    def write_adapter(self, table: AdapterPageTable, weights: AdapterWeights) -> None:
        """Copy an adapter's ``A`` rows and ``B^T`` rows into its pages (layout: server/page_layout.py)."""

    def drop_adapter(self, uid: int) -> None:  # noqa: B027 (backends without caches keep nothing)
        """Forget whatever was derived from adapter ``uid``'s pages (it was evicted; pages get reused)."""

    @abstractmethod
    def __contains__(self, uid: int) -> bool:
        """Whether the backend holds anything derived from adapter ``uid``'s pages."""

    @abstractmethod
    def prepare_step(self, segments: LoraSegments, adapters: Sequence[AdapterPageTable],
                     pack: StepPack, samples: LoraSegments | None = None) -> LoraStep:
        """This step's LoRA state. ``segments.seg_slots`` index ``adapters``; -1 is no adapter.
        ``samples``: the same for the step's sample rows (the lm_head group's rows); None if the
        step applies no lm_head LoRA."""
