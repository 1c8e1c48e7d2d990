"""server/arena.py: the pool's host memory is zeroed, 2 MiB-aligned and eligible for huge pages where
those can't stall a fault."""

import gc
import re
from pathlib import Path

import pytest
import torch

from server.arena import HUGE_PAGE, huge_pages_without_stalls, zeroed_pages

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
    pages = zeroed_pages(200, 24576, huge_pages=True)
    pages.fill_(1)
    assert _smaps_entry(pages.data_ptr()).get("THPeligible") == "1"


@pytest.mark.parametrize(("mode", "huge"), [
    ("always defer defer+madvise [madvise] never", False),
    ("[always] defer defer+madvise madvise never", False),
    ("always defer [defer+madvise] madvise never", False),
    ("always [defer] defer+madvise madvise never", True),
    ("always defer defer+madvise madvise [never]", True),
])
def test_huge_pages_only_where_a_fault_cannot_stall(tmp_path: Path, mode: str, huge: bool) -> None:
    defrag = tmp_path / "defrag"
    defrag.write_text(mode + "\n")
    assert huge_pages_without_stalls(defrag) is huge
    assert huge_pages_without_stalls(tmp_path / "missing") is False


@pytest.mark.skipif(not THP.is_file() or "[never]" in THP.read_text(), reason="no transparent huge pages")
def test_default_follows_the_defrag_mode() -> None:
    pages = zeroed_pages(200, 24576)
    pages.fill_(1)
    eligible = _smaps_entry(pages.data_ptr()).get("THPeligible") == "1"
    # with THP enabled only on request ("madvise"), only an advised mapping is eligible
    if "[madvise]" in THP.read_text():
        assert eligible is huge_pages_without_stalls()


def test_mapping_outlives_views_only() -> None:
    """The tensor keeps its mapping alive: a view taken before the tensor is dropped still reads."""
    view = zeroed_pages(3, 4096).view(torch.int32)[1]
    gc.collect()
    view.fill_(7)
    assert int(view.sum()) == 7 * 1024
