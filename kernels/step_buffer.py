"""A step's metadata: packed on the host into one int32 buffer, copied to the device once.

Why: every small tensor made with ``torch.tensor(list, device=cuda)`` is a separate host-to-device
copy from pageable memory, which blocks the host until the stream has caught up. A step needs
dozens of such arrays (token ids, positions, slot mapping, block tables, sequence lengths, the LoRA
work lists and adapter descriptors), and building them per layer or per module multiplied that by
hundreds. Here the batch builder and the LoRA backend add named int32 sections to a ``StepPack``
(numpy, no torch); ``StepBuffer.upload`` writes them into one host buffer (pinned on CUDA, so the
copy is a true asynchronous DMA), issues one ``non_blocking`` copy into a persistent device buffer,
and returns views of it by name. The forward then reads only those views.

Both buffers are reused across steps and grow by powers of two, so in the steady state their
addresses do not change (what CUDA-graph capture needs; see docs/internals.md). On CPU the
"device" buffer is a second host buffer: the copy is a memcpy of a few KB, kept so that the code
path is the same everywhere and a step's views never alias the buffer the next step is packing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ALIGN = 16  # elements: each section starts on a 64-byte boundary
MIN_CAPACITY = 1 << 12


class StepPack:
    """Named int32 sections of one step, on the host (plain numpy)."""

    def __init__(self) -> None:
        self.sections: dict[str, np.ndarray] = {}

    def add(self, name: str, values: np.ndarray | Sequence[int]) -> None:
        """Add a section; ``values`` keeps its shape (the device view has the same shape)."""
        if name in self.sections:
            raise ValueError(f"section {name!r} added twice")
        arr = np.asarray(values, dtype=np.int32)
        self.sections[name] = arr

    def layout(self) -> tuple[dict[str, int], int]:
        """Element offset of each section, and the total size (aligned)."""
        offsets, total = {}, 0
        for name, arr in self.sections.items():
            offsets[name] = total
            total += -(-arr.size // ALIGN) * ALIGN
        return offsets, total


def _capacity(n: int) -> int:
    return max(MIN_CAPACITY, 1 << (n - 1).bit_length())


class StepBuffer:
    """The host staging buffer and the device buffer a step's sections are uploaded through."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned = device.type == "cuda"
        self._host: torch.Tensor | None = None
        self._host_np: np.ndarray | None = None
        self._dev: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def _ensure(self, total: int) -> None:
        if self._dev is not None and self._dev.numel() >= total:
            return
        cap = _capacity(total)
        if self._pinned:
            self._host = torch.empty(cap, dtype=torch.int32, pin_memory=True)
            self._host_np = self._host.numpy()
        else:
            self._host_np = np.empty(cap, dtype=np.int32)
            self._host = torch.from_numpy(self._host_np)
        self._dev = torch.empty(cap, dtype=torch.int32, device=self.device)

    def upload(self, pack: StepPack) -> dict[str, torch.Tensor]:
        """Write ``pack`` into the host buffer, copy it to the device once, return views by name."""
        offsets, total = pack.layout()
        self._ensure(max(total, 1))
        if self._copied is not None and not self._copied.query():
            # The previous step's copy still reads the host buffer (not seen in practice: sampling
            # waits for the whole step), so wait for that copy, not for the device's other work.
            self._copied.synchronize()
        host = self._host_np
        for name, arr in pack.sections.items():
            off = offsets[name]
            host[off : off + arr.size] = arr.reshape(-1)
        self._dev[:total].copy_(self._host[:total], non_blocking=self._pinned)
        if self._pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()
        return {name: self._dev[offsets[name] : offsets[name] + arr.size].view(arr.shape)
                for name, arr in pack.sections.items()}
