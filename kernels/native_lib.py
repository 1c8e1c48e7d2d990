"""Building and loading the CPU C kernels: LoRA (``kernels/lora_native.c``, used by kernels/lora_native.py),
the base model's fused ops (``kernels/model_native.c``, used by kernels/model_native.py) and an
adapter's load (``kernels/adapter_copy.c``: its file's finiteness check, its rows into its pages).

The C sources are compiled on first use, into one shared library, with the system C compiler into a per-
user cache (``$LORA_SERVER_KERNEL_CACHE``, default ``~/.cache/lora-server/kernels``), keyed by a hash of
the sources, the flags and the compiler, and loaded with ctypes. It links OpenMP by soname
(``libgomp.so.1``), so it shares the thread pool torch has already loaded instead of starting a second
one that would spin against it on a small machine. Without a compiler ``available()`` is False and the
engine keeps the torch backends (``kernels/lora_torch.py``, the references of the model ops).
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

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(n) for n in ("lora_native.c", "model_native.c", "adapter_copy.c"))
# Included by the sources: part of the cache key.
HEADERS = tuple(Path(__file__).with_name(n) for n in ("native_simd.h", "lora_ahead.h"))
# Reassociation lets the compiler vectorize the dot products; NaN/inf semantics are kept.
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fassociative-math",
              "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# (compiler flag, /proc/cpuinfo flag): AVX-512 (F/BW/VL) widens the kernels' vectors to 16 floats.
ISA_FLAGS = (("-mavx2", "avx2"), ("-mfma", "fma"), ("-mf16c", "f16c"), ("-mavx512f", "avx512f"),
             ("-mavx512bw", "avx512bw"), ("-mavx512vl", "avx512vl"))


def _flags() -> tuple[str, ...]:
    """Base flags plus the vector extensions this CPU has (never -march=native: a cached build
    must not use instructions another machine sharing the cache lacks; the key includes these)."""
    cpu = cpu_flags()
    extra = tuple(f for f, need in ISA_FLAGS if need in cpu)
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
    texts = [src.read_text() for src in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, *flags, version]).encode()).hexdigest()[:16]
    out_dir = cache_dir or _cache_dir()
    lib = out_dir / f"lora_server_kernels-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_lib = Path(tmp) / lib.name
        cmd = [cc, *flags, *map(str, SOURCES), "-o", str(tmp_lib), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the CPU kernels failed:\n{proc.stderr.strip()}")
        os.replace(tmp_lib, lib)  # atomic: concurrent builders each install a whole file
    log.info("built the CPU kernels: %s", lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and return types of every exported function (ctypes would guess int otherwise)."""
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    sigs = {
        "lora_group": (i32, [i32, p, p, i64, p, i64, i64, i64, p, p, i64, i64, p, p, p, i32, i32, i64]),
        "scatter_rows": (None, [p, i32, i64, p, p]),
        "all_finite": (i32, [p, i64, i32]),
        "row_offsets": (i32, [i64, p, p, i64, i64, i64, p]),
        "add_rms_norm": (i32, [i32, p, i64, p, i64, p, p, i64, i64, i64, f32, i32]),
        "silu_mul": (i32, [i32, p, i64, p, i64, i64, i64, i32]),
        "rope_store_kv": (i32, [i32, p, i64, i64, i64, i64, i64, p, p, p, p, p, i64, i32]),
        "paged_attention": (i32, [i32, p, i64, p, i64, p, p, i64, p, p, p, i64, i64, i64, i64, i64, f32,
                                  i32]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first call; None (reason logged once) if it can't be."""
    global _lib, _failed
    with _lock:
        if _lib is None and _failed is None:
            try:
                lib = ctypes.CDLL(str(build()))
                _declare(lib)
                _lib = lib
            except (OSError, RuntimeError) as e:
                _failed = str(e)
                log.warning("CPU C kernels unavailable, using the torch paths: %s", e)
        return _lib


def available() -> bool:
    return library() is not None
