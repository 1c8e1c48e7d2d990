"""How much memory the pool may take when no ``--pool-bytes`` is given. Plain Python; no torch.

Like vLLM's ``gpu_memory_utilization``, the pool takes a stated fraction of the memory available when
the engine starts (after the model's weights are loaded, so they are already excluded). On a host
that is ``MemAvailable`` (free memory plus what the kernel can reclaim from caches), lowered to the
room left under the process's cgroup memory limit when it runs in a container, where
``/proc/meminfo`` shows the whole machine. The arena is allocated zeroed by the allocator, so pages
cost resident memory only once they are written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.35  # of the available memory: on a 24 GiB machine ~7 GiB of pages
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) is not a number


def cgroup_room(v2: Path = _CGROUP_V2, v1: Path = _CGROUP_V1) -> int | None:
    """Bytes left under this process's cgroup memory limit, or None without a limit."""
    for limit_file, usage_file in ((v2 / "memory.max", v2 / "memory.current"),
                                   (v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 "no limit" is ~2^63
            return max(limit - usage, 0)
    return None


def available_bytes() -> int:
    """Memory this process can still use: MemAvailable, capped by the cgroup's room."""
    host = _meminfo_available()
    if host is None:
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = cgroup_room()
    return host if room is None else min(host, room)


def pool_budget(fraction: float, available: int | None = None) -> int:
    """``fraction`` of the available bytes (measured now unless given)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the pool's memory fraction must be in (0, 1], got {fraction}")
    return int((available_bytes() if available is None else available) * fraction)
