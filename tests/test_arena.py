"""server/arena.py: the pool's host memory is zeroed, 2 MiB-aligned and eligible for huge pages."""

import gc
import re
from pathlib import Path

import pytest
import torch

from server.arena import HUGE_PAGE, prefault, zeroed_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _smaps_entry(addr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding ``addr``."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head[1], 16) <= addr < int(head[2], 16)
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def test_zeroed_aligned_and_writable() -> None:
    pages = zeroed_pages(7, 24576)
    assert pages.shape == (7, 24576) and pages.dtype == torch.uint8
    assert pages.data_ptr() % HUGE_PAGE == 0
    assert int(pages.count_nonzero()) == 0
    floats = pages.view(torch.float32)
    floats[6, -1] = 1.5
    assert float(pages.view(torch.float32)[6, -1]) == 1.5


@pytest.mark.skipif(not THP.is_file() or "[never]" in THP.read_text(), reason="no transparent huge pages")
def test_mapping_is_eligible_for_huge_pages() -> None:
    """A private anonymous mapping advised MADV_HUGEPAGE (a shared one would be shmem: not eligible)."""
    pages = zeroed_pages(200, 24576)
    pages.fill_(1)
    assert _smaps_entry(pages.data_ptr()).get("THPeligible") == "1"


def test_mapping_outlives_views_only() -> None:
    """The tensor keeps its mapping alive: a view taken before the tensor is dropped still reads."""
    view = zeroed_pages(3, 4096).view(torch.int32)[1]
    gc.collect()
    view.fill_(7)
    assert int(view.sum()) == 7 * 1024


def _rss_kib(pages: torch.Tensor) -> int:
    return int(_smaps_entry(pages.data_ptr())["Rss"].split()[0])


def test_prefault_commits_the_first_bytes_and_leaves_them_zero() -> None:
    """The first bytes are in memory before anything writes them (a fresh mapping has none)."""
    if not prefault(zeroed_pages(1, 4096), 4096):
        pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14")
    lazy = zeroed_pages(400, 24576)
    assert _rss_kib(lazy) == 0
    pages = zeroed_pages(400, 24576, prefault_bytes=4 << 20)
    assert _rss_kib(pages) >= 4 << 10
    assert _rss_kib(pages) < 400 * 24576 // 1024  # only what was asked (plus at most a huge page)
    assert int(pages.count_nonzero()) == 0
