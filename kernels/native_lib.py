"""Building and loading the CPU LoRA kernel (``kernels/lora_native.c``; used by kernels/lora_native.py).

The C source is compiled on first use with the system C compiler into a per-user cache
(``$LORA_SERVER_KERNEL_CACHE``, default ``~/.cache/lora-server/kernels``), keyed by a hash of the
source, the flags and the compiler, and loaded with ctypes. It links OpenMP by soname
(``libgomp.so.1``), so it shares the thread pool torch has already loaded instead of starting a
second one that would spin against it on a small machine. Without a compiler ``available()`` is
False and the engine keeps the torch backend (``kernels/lora_torch.py``).
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

SOURCE = Path(__file__).with_name("lora_native.c")
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
                               ctypes.c_int, ctypes.c_int, i64]
                lib.copy_rows.restype = None
                lib.copy_rows.argtypes = [p, i64, p, p, p, ctypes.c_int]
                _lib = lib
            except (OSError, RuntimeError) as e:
                _failed = str(e)
                log.warning("CPU LoRA kernel unavailable, using the torch path: %s", e)
        return _lib


def available() -> bool:
    return library() is not None
