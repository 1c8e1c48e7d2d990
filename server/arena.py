"""The pool's memory (the arena): zeroed pages, on a host in a mapping the OS may back with 2 MiB pages.

Why: a decode step streams every row of every adapter in it (442 MB for 64 q,k,v,o adapters in
bf16) from pages scattered over the arena. In 4 KiB pages that is a TLB miss every 64 cache lines,
each a page walk (two-dimensional under a hypervisor); the arena in 2 MiB pages makes those walks
512x rarer. Transparent huge pages are often enabled only on request (``madvise`` in
/sys/kernel/mm/transparent_hugepage/enabled), so the arena is its own anonymous mapping, aligned
to 2 MiB and marked ``MADV_HUGEPAGE``. Like ``calloc``, the OS supplies zero pages as they are
first written, so an arena sized to a fraction of the machine stays mostly uncommitted (in 2 MiB
steps instead of 4 KiB ones).

A first write can be slow, though: where ``defrag`` is ``madvise`` (this VM), a fault in an advised
mapping compacts memory on the spot when no free 2 MiB page is at hand, which a page cache full of
adapter files makes common. A burst of cold adapters into a fresh pool then paid 4-12 ms per adapter
write against 2.4 ms in 4 KiB pages. The pool hands out its lowest pages first and reuses freed pages
first, so ``PREFAULT_BYTES`` at the start of the arena are faulted in when it is made, before serving,
and the first bursts land there. (4 KiB pages instead would cost every decode step: 64 adapters, 2
cores, 43 steps each: 187-190 ms against 171-178 ms in huge pages.)
"""

from __future__ import annotations

import ctypes
import logging
import mmap

import numpy as np
import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
PREFAULT_BYTES = 256 << 20
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault pages in, writable, without touching their contents


def zeroed_pages(num_pages: int, page_bytes: int, device: torch.device | str = "cpu",
                 prefault_bytes: int = 0) -> torch.Tensor:
    """``[num_pages, page_bytes]`` zero bytes (uint8); on a host, 2 MiB-aligned and advised to be
    backed by huge pages (where the OS supports it: otherwise plain zeroed pages), its first
    ``prefault_bytes`` faulted in at once. The tensor keeps its mapping alive (numpy's ``base``
    chain)."""
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
    pages = torch.from_numpy(whole[skip : skip + size].reshape(num_pages, page_bytes))
    prefault(pages, prefault_bytes)
    return pages


def prefault(pages: torch.Tensor, nbytes: int) -> bool:
    """Fault in the first ``nbytes`` of ``pages`` (a page-aligned host buffer) now, without changing
    them; False where the kernel can't (before 5.14) or nothing was asked."""
    nbytes = min(nbytes, pages.numel() * pages.element_size())
    if nbytes <= 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(pages.data_ptr(), nbytes, MADV_POPULATE_WRITE) != 0:  # ctypes drops the GIL
        log.debug("cannot prefault the arena: errno %d", ctypes.get_errno())
        return False
    return True
