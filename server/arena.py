"""The pool's memory (the arena): zeroed pages, on a host in a mapping the OS may back with 2 MiB pages.

Why: a decode step streams every row of every adapter in it (442 MB for 64 q,k,v,o adapters in
bf16) from pages scattered over the arena. In 4 KiB pages that is a TLB miss every 64 cache lines,
each a page walk (two-dimensional under a hypervisor); the arena in 2 MiB pages makes those walks
512x rarer. Transparent huge pages are often enabled only on request (``madvise`` in
/sys/kernel/mm/transparent_hugepage/enabled), so the arena is its own anonymous mapping, aligned
to 2 MiB and marked ``MADV_HUGEPAGE``. Like ``calloc``, the OS supplies zero pages as they are
first written, so an arena sized to a fraction of the machine stays mostly uncommitted (in 2 MiB
steps instead of 4 KiB ones).
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

HUGE_PAGE = 2 << 20


def zeroed_pages(num_pages: int, page_bytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[num_pages, page_bytes]`` zero bytes (uint8); on a host, 2 MiB-aligned and advised to be
    backed by huge pages (where the OS supports it: otherwise plain zeroed pages). The tensor keeps
    its mapping alive (numpy's ``base`` chain)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.zeros(num_pages, page_bytes, dtype=torch.uint8, device=device)
    size = num_pages * page_bytes
    # private: a shared anonymous mapping is shmem, which THP leaves alone here (shmem_enabled)
    mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(mapping, dtype=np.uint8)
    skip = -whole.ctypes.data % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.from_numpy(whole[skip : skip + size].reshape(num_pages, page_bytes))
