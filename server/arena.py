"""The pool's memory (the arena): zeroed pages, on a host in a mapping the OS may back with 2 MiB pages.

Why: a decode step streams every row of every adapter in it (442 MB for 64 q,k,v,o adapters in
bf16) from pages scattered over the arena. In 4 KiB pages that is a TLB miss every 64 cache lines,
each a page walk (two-dimensional under a hypervisor); the arena in 2 MiB pages makes those walks
512x rarer. Transparent huge pages are often enabled only on request (``madvise`` in
/sys/kernel/mm/transparent_hugepage/enabled), so the arena is its own anonymous mapping, aligned
to 2 MiB and marked ``MADV_HUGEPAGE``. Like ``calloc``, the OS supplies zero pages as they are
first written, so an arena sized to a fraction of the machine stays mostly uncommitted (in 2 MiB
steps instead of 4 KiB ones).

But only where a huge-page fault never waits on compaction (``defrag`` set to ``defer`` or
``never``). Under ``madvise``, ``always`` or ``defer+madvise`` a fault in an advised mapping
compacts memory on the spot when no free 2 MiB page is at hand, which a page cache full of adapter
files makes common. On this VM (defrag ``madvise``) that made a cold adapter's write into fresh
pages take 4-12 ms (compaction stalls in /proc/vmstat) against 2.4 ms in 4 KiB pages, while huge
pages had sped the decode step's LoRA kernel up by only 3-4% (64 adapters: 17.3 to 16.8 ms in bf16,
34.2 to 32.9 ms in fp32). There the arena stays in 4 KiB pages.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import numpy as np
import torch

HUGE_PAGE = 2 << 20
DEFRAG = Path("/sys/kernel/mm/transparent_hugepage/defrag")


def huge_pages_without_stalls(defrag: Path = DEFRAG) -> bool:
    """True if a fault in a ``MADV_HUGEPAGE`` mapping never compacts memory on the spot: it takes a
    free 2 MiB page or falls back to 4 KiB ones (see the module docstring)."""
    try:
        mode = re.search(r"\[(\S+)\]", defrag.read_text())
    except OSError:
        return False
    return mode is not None and mode[1] in ("defer", "never")


def zeroed_pages(num_pages: int, page_bytes: int, device: torch.device | str = "cpu",
                 huge_pages: bool | None = None) -> torch.Tensor:
    """``[num_pages, page_bytes]`` zero bytes (uint8); on a host, 2 MiB-aligned and, with
    ``huge_pages`` (default: where that can't stall a fault), advised to be backed by huge pages. The
    tensor keeps its mapping alive (numpy's ``base`` chain)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.zeros(num_pages, page_bytes, dtype=torch.uint8, device=device)
    size = num_pages * page_bytes
    # private: a shared anonymous mapping is shmem, which THP leaves alone here (shmem_enabled)
    mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(mapping, dtype=np.uint8)
    skip = -whole.ctypes.data % HUGE_PAGE
    if huge_pages is None:
        huge_pages = huge_pages_without_stalls()
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.from_numpy(whole[skip : skip + size].reshape(num_pages, page_bytes))
