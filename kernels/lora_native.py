"""The CPU LoRA kernel (``kernels/lora_native.c``): build, load, and the tables it reads.

The C source is compiled on first use with the system C compiler into a per-user cache
(``$LORA_SERVER_KERNEL_CACHE``, default ``~/.cache/lora-server/kernels``), keyed by a hash of the
source, the flags and the compiler, and loaded with ctypes. It links OpenMP by soname
(``libgomp.so.1``), so it shares the thread pool torch has already loaded instead of starting a
second one that would spin against it on a small machine. Without a compiler ``available()`` is
False and the engine keeps the torch path (``kernels/lora.py``), which is also the reference the
kernel is tested against.

Tables: per resident adapter, ``AdapterRows`` holds the element offsets of every row of every
(layer, module) matrix in the arena and a descriptor per (layer, module): ``(rank, address of the
A row offsets, address of the B^T row offsets, scale)``, the C struct ``Desc``. Built once when
the adapter is first used (pure arithmetic on its page table) and dropped when it is evicted.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from adapter_store.peft_config import LORA_MODULES
from server.page_layout import AdapterPageTable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_native.c")
MODULES = LORA_MODULES  # a descriptor's index along its module axis
MODULE_INDEX = {m: i for i, m in enumerate(MODULES)}
NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # of the arena, x and y
DESC_FIELDS = 4  # rank, a_rows address, b_rows address, scale (float64 bits)
# Reassociation lets the compiler vectorize the dot products; NaN/inf semantics are kept.
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fassociative-math",
              "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _flags() -> tuple[str, ...]:
    """Base flags plus the vector extensions this CPU has (never -march=native: a cached build
    must not use instructions another machine sharing the cache lacks; the key includes these)."""
    cpu = _cpu_flags()
    extra = tuple(f for f, need in (("-mavx2", "avx2"), ("-mfma", "fma"), ("-mf16c", "f16c")) if need in cpu)
    return BASE_FLAGS + extra


def _cache_dir() -> Path:
    env = os.environ.get("LORA_SERVER_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora-server" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(cache_dir: Path | None = None) -> Path:
    """Compile the kernel (if not cached) and return the shared library's path."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    flags = _flags()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *flags, version]).encode()).hexdigest()[:16]
    out_dir = cache_dir or _cache_dir()
    lib = out_dir / f"lora_native-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_lib = Path(tmp) / lib.name
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp_lib)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr.strip()}")
        os.replace(tmp_lib, lib)  # atomic: concurrent builders each install a whole file
    log.info("built the CPU LoRA kernel: %s", lib)
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first call; None (reason logged once) if it can't be."""
    global _lib, _failed
    with _lock:
        if _lib is None and _failed is None:
            try:
                lib = ctypes.CDLL(str(build()))
                fn = lib.lora_group
                fn.restype = ctypes.c_int
                p, i64 = ctypes.c_void_p, ctypes.c_int64
                fn.argtypes = [ctypes.c_int, p, p, i64, p, i64, i64, i64, p, p, i64, i64, p, p, p,
                               ctypes.c_int]
                lib.copy_rows.restype = None
                lib.copy_rows.argtypes = [p, i64, p, p, p, ctypes.c_int]
                _lib = lib
            except (OSError, RuntimeError) as e:
                _failed = str(e)
                log.warning("CPU LoRA kernel unavailable, using the torch path: %s", e)
        return _lib


def available() -> bool:
    return library() is not None


class AdapterRows:
    """One adapter's row offsets and descriptors ``[num_layers, len(MODULES), DESC_FIELDS]`` (int64)."""

    def __init__(self, table: AdapterPageTable, num_layers: int, page_elems: int) -> None:
        offsets: list[int] = []
        spans: dict[tuple[int, str], tuple[int, int, int]] = {}
        for key, mat in table.modules.items():
            first_a = len(offsets)
            offsets += _row_offsets(mat.a_pages, mat.rank, mat.in_features, page_elems)
            first_b = len(offsets)
            offsets += _row_offsets(mat.b_pages, mat.rank, mat.out_features, page_elems)
            spans[key] = (mat.rank, first_a, first_b)
        self.rows = torch.tensor(offsets or [0], dtype=torch.int64)
        base, item = self.rows.data_ptr(), self.rows.element_size()
        desc = torch.zeros(num_layers, len(MODULES), DESC_FIELDS, dtype=torch.int64)
        scales = torch.zeros(num_layers, len(MODULES), dtype=torch.float64)
        for (layer, module), (rank, first_a, first_b) in spans.items():
            m = MODULE_INDEX[module]
            desc[layer, m, :3] = torch.tensor([rank, base + first_a * item, base + first_b * item])
            scales[layer, m] = table.modules[(layer, module)].scale
        desc[:, :, 3] = scales.view(torch.int64)
        self.desc = desc


def _row_offsets(pages: tuple[int, ...], rank: int, row_len: int, page_elems: int) -> list[int]:
    """Element offset of each of ``rank`` rows (layout: server/page_layout.py)."""
    rpp = page_elems // row_len
    if rpp < 1 or len(pages) * rpp < rank:
        raise ValueError(f"{rank} rows of {row_len} do not fit {len(pages)} pages of {page_elems}")
    return [pages[j // rpp] * page_elems + (j % rpp) * row_len for j in range(rank)]


def write_adapter_rows(arena: torch.Tensor, page_elems: int,
                       matrices: list[tuple[torch.Tensor, tuple[int, ...]]]) -> None:
    """Copy each ``rows [r, row_len]`` into ``arena`` at its ``pages`` (layout: server/page_layout.py).

    Same result as ``write_matrix_rows`` per matrix, in one kernel call; rows are cast to the
    arena's dtype first. The tails of partly used pages are left as they are: no reader looks past
    a matrix's ``rank`` rows.
    """
    lib = library()
    assert lib is not None, "write_adapter_rows used without the kernel"
    if arena.device.type != "cpu" or not arena.is_contiguous() or arena.shape[1] != page_elems:
        raise ValueError("the arena must be a contiguous CPU tensor [num_pages, page_elems]")
    item, limit = arena.element_size(), arena.numel()
    keep, dsts, srcs, lens = [], [], [], []
    for rows, pages in matrices:
        num_rows, row_len = rows.shape
        src = rows.to(arena.dtype).contiguous()
        keep.append(src)
        offsets = _row_offsets(pages, num_rows, row_len, page_elems)
        if num_rows and (min(pages) < 0 or offsets[-1] + row_len > limit):
            raise ValueError("a matrix's pages lie outside the arena")
        dsts += [o * item for o in offsets]
        srcs += [src.data_ptr() + j * row_len * item for j in range(num_rows)]
        lens += [row_len * item] * num_rows
    if dsts:
        t = [torch.tensor(v, dtype=torch.int64) for v in (dsts, srcs, lens)]
        lib.copy_rows(arena.data_ptr(), len(dsts), t[0].data_ptr(), t[1].data_ptr(), t[2].data_ptr(),
                      torch.get_num_threads())


class NativeStep:
    """One step's descriptors ``[num_layers, num_segments, len(MODULES), DESC_FIELDS]`` and segments."""

    def __init__(self, seg_starts: tuple[int, ...], rows: list[AdapterRows | None], num_layers: int) -> None:
        none = torch.zeros(num_layers, len(MODULES), DESC_FIELDS, dtype=torch.int64)
        self.keep = rows  # the row tables the descriptors point into stay alive with the step
        self.desc = torch.stack([none if r is None else r.desc for r in rows], dim=1).contiguous()
        self.seg_starts = torch.tensor(seg_starts, dtype=torch.int64)
        self.num_segments = len(rows)
        self.num_tokens = seg_starts[-1]

    def apply_group(self, arena: torch.Tensor, layer: int, modules: tuple[str, ...], x: torch.Tensor,
                    y: torch.Tensor, widths: tuple[int, ...]) -> None:
        """``y[t, cols_m] += scale * (x[t] @ A_m.T) @ B_m.T`` for each module of the group, every token."""
        lib = library()
        assert lib is not None, "NativeStep used without the kernel"
        if x.dtype != arena.dtype or y.dtype != arena.dtype or x.stride(1) != 1 or y.stride(1) != 1:
            raise ValueError("x and y need the arena's dtype and unit column stride")
        if x.shape[0] != self.num_tokens or y.shape[0] != x.shape[0]:
            raise ValueError(f"x and y must have {self.num_tokens} rows")
        mods, cols, wid = _group_arrays(modules, widths)
        per_layer = self.num_segments * len(MODULES) * DESC_FIELDS * 8
        rc = lib.lora_group(int(arena.dtype == torch.bfloat16), arena.data_ptr(), x.data_ptr(), x.stride(0),
                            y.data_ptr(), y.stride(0), x.shape[1], self.num_segments,
                            self.seg_starts.data_ptr(), self.desc.data_ptr() + layer * per_layer,
                            len(MODULES), len(modules), mods.data_ptr(), cols.data_ptr(), wid.data_ptr(),
                            torch.get_num_threads())
        if rc != 0:
            raise MemoryError("CPU LoRA kernel: out of memory for its work buffers")


_GROUPS: dict[tuple[tuple[str, ...], tuple[int, ...]], tuple[torch.Tensor, ...]] = {}


def _group_arrays(modules: tuple[str, ...], widths: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    key = (modules, widths)
    hit = _GROUPS.get(key)
    if hit is None:
        cols = [sum(widths[:i]) for i in range(len(widths))]
        hit = _GROUPS[key] = tuple(torch.tensor(v, dtype=torch.int64)
                                   for v in ([MODULE_INDEX[m] for m in modules], cols, list(widths)))
    return hit
