"""One OpenMP team per process: the engine's.

libgomp gives every thread that opens a parallel region a team of its own, keeps that team's workers
until the thread exits, and counts the workers of all teams together. Once it counts more threads than
cores, it cuts the spin at barriers from GOMP_SPINCOUNT to about a hundred iterations. After that, each
of the hundreds of small parallel ops in a step (norms, RoPE, adds) ends with the workers asleep and
starts with a futex wake-up. On 2 cores, a 256x576 add took 42-65 us on a second thread against
13-24 us on the first. The quick base workload ran 2-34% slower (7 of 7 pairs) with the engine on a
thread of its own, as in the HTTP server, than on the thread that loaded the model.

So only the engine thread keeps a team:
- ``release_team()``: the thread that loaded the model frees its workers before the engine thread opens
  its own team (``AsyncEngine.start``).
- ``single_threaded()``: every other thread that may run torch ops or our C kernels (adapter loader,
  store watcher, upload handlers, the HTTP event loop) runs them inline, without a team.

Both are no-ops where torch runs on another OpenMP runtime, or on none.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep nothing else


def _loaded(name: str) -> set[str]:
    """Paths of the loaded shared libraries whose file name starts with ``name``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {p for p in (line.split()[-1] for line in maps.splitlines()) if Path(p).name.startswith(name)}


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch has loaded (ctypes gets the same handle, not a second runtime), or None."""
    torch.get_num_threads()  # makes sure torch's runtime is loaded and initialized
    paths = _loaded("libgomp")
    if len(paths) != 1:
        if paths:
            log.warning("several OpenMP runtimes loaded (%s): not managing OpenMP teams",
                        ", ".join(sorted(paths)))
        return None
    lib = ctypes.CDLL(paths.pop())
    if not hasattr(lib, "omp_pause_resource_all"):
        return None
    lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
    lib.omp_set_num_threads.argtypes = [ctypes.c_int]
    return lib


@functools.cache
def _mkl_local() -> Callable[[int], int] | None:
    """MKL's per-thread thread count, from the MKL linked into torch (its GEMMs open teams too)."""
    for path in _loaded("libtorch_cpu"):
        fn = getattr(ctypes.CDLL(path), "MKL_Set_Num_Threads_Local", None)  # the C API (by value)
        if fn is not None:
            fn.argtypes = [ctypes.c_int]
            return fn
    return None


def release_team() -> bool:
    """Free the calling thread's OpenMP workers; its next parallel region starts a new team. Call it
    outside any parallel region. True if a runtime was there to do it."""
    lib = _libgomp()
    if lib is None:
        return False
    if lib.omp_pause_resource_all(OMP_PAUSE_SOFT) != 0:
        log.warning("OpenMP refused to free this thread's workers")
        return False
    return True


def single_threaded() -> None:
    """Run the calling thread's parallel ops inline from now on: torch and the C kernels read the
    thread's own OpenMP thread count, so this thread never opens a team."""
    lib = _libgomp()
    if lib is None:
        return
    # torch sets a thread's count from its global setting at the thread's first op: do that first,
    # or it would overwrite the 1 below.
    torch.get_num_threads()
    lib.omp_set_num_threads(1)
    mkl = _mkl_local()
    if mkl is not None:
        mkl(1)
