"""Load a PEFT LoRA adapter directory into host tensors, refusing anything we cannot serve exactly.

A PEFT dir holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys like
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (older PEFT inserts the adapter
name: ``...lora_A.default.weight``). Weights are only read as safetensors: pickled ``.bin`` files
are refused because unpickling runs arbitrary code.

Reading is lazy: the safetensors header is parsed and every check that needs only names, dtypes and
shapes (modules, layers, ranks against the config and the base model) runs before any tensor byte
is read (adapter_store/peft_plan.py, cached per config and header); then tensors are read by offset:
the LoRA factors in one read when they share a dtype, the rest one at a time. Peak memory is the
parsed adapter plus one tensor, not the file two or three times over; a caller that has the file's
bytes already (the store's loader: it hashed them) passes them, and tensors are views of them
where no cast is needed. Plain reads, not mmap: a store file truncated under a mapping would kill
the process with SIGBUS.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from adapter_store.fsio import sha256_file
from adapter_store.peft_config import LoraConfigInfo, parse_adapter_config
from adapter_store.peft_keys import BASE_LAYER, COPY, MAGNITUDE, WEIGHTS_NAME, A, B, tensor_key
from adapter_store.peft_plan import CONFIG_NAME, TORCH_DTYPES, LoadPlan, load_plan
from adapter_store.safetensors_header import TensorEntry, file_header_bytes, header_bytes
from server.errors import InvalidAdapter
from server.model_config import ModelConfig

__all__ = [
    "CONFIG_NAME",
    "TOKENIZER_FILES",
    "WEIGHTS_NAME",
    "LoraConfigInfo",
    "LoraWeights",
    "ParsedAdapter",
    "check_adapter_files",
    "load_peft_adapter",
    "parse_adapter_config",
]

logger = logging.getLogger(__name__)

# An adapter's own tokenizer (saved beside it when tokens were added): a fast tokenizer's files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is ~1 KB
_FINITE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # kernels/adapter_copy.c


@dataclass(frozen=True)
class LoraWeights:
    """One (layer, module)'s LoRA factors: ``delta_W = scale * b @ a`` (shape ``[out, in]``).

    DoRA (``magnitude`` from the file): the module computes ``g * (W0 x + scale * b @ a @ x)`` with
    ``g = magnitude / ||W0 + scale * b @ a||`` per output row; ``dora_scale`` is that ``g``, computed
    once against the base weights (server/dora.py) before the adapter is placed in pages.
    """

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    rank: int
    scale: float
    magnitude: torch.Tensor | None = None  # [out_features] (DoRA)
    dora_scale: torch.Tensor | None = None  # [out_features] float32 (DoRA, once computed)
    replace: bool = False  # a full copy of the module: ``y = scale * b @ a @ x``, the base's dropped

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.a, self.b, self.magnitude, self.dora_scale) if t is not None)


@dataclass(frozen=True)
class ParsedAdapter:
    """A validated adapter in host memory. ``checksum`` is the sha256 hex of the weights file.

    ``base_layers``: the whole embed_tokens / lm_head weights PEFT saved with the LoRA of those
    modules; ``copies``: the full copies ``modules_to_save`` asks for (by module name, ``[vocab,
    hidden]``). server/adapter_prep.py turns both into what the pool holds. ``vocab_size``: the
    adapter's vocabulary (the base's, or more with added tokens).
    """

    config: LoraConfigInfo
    weights: dict[tuple[int, str], LoraWeights]
    checksum: str
    base_layers: dict[str, torch.Tensor] = field(default_factory=dict)
    copies: dict[str, torch.Tensor] = field(default_factory=dict)
    vocab_size: int = 0
    source_dtype: torch.dtype | None = None  # the one dtype of its tensors in the file (None: mixed)

    @cached_property
    def nbytes(self) -> int:
        """Host bytes held by all tensors (asked by the host cache and the size checks of a load)."""
        return (sum(w.nbytes for w in self.weights.values())
                + sum(t.nbytes for t in (*self.base_layers.values(), *self.copies.values())))

    @property
    def ranks(self) -> tuple[int, ...]:
        """Distinct ranks over all targeted modules, ascending (usually one value)."""
        return tuple(sorted({w.rank for w in self.weights.values()}))

    @property
    def max_rank(self) -> int:
        return max(self.ranks)


def check_adapter_files(names: set[str]) -> None:
    """Raise InvalidAdapter unless ``names`` include the config and the safetensors weights."""
    if WEIGHTS_NAME not in names:
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise InvalidAdapter(
                f"pickled weights ({', '.join(pickles)}) are not accepted because loading them can run "
                f"arbitrary code; save the adapter with safetensors ({WEIGHTS_NAME})"
            )
        raise InvalidAdapter(f"{WEIGHTS_NAME} is missing", param=WEIGHTS_NAME)
    if CONFIG_NAME not in names:
        raise InvalidAdapter(f"{CONFIG_NAME} is missing", param=CONFIG_NAME)


def load_peft_adapter(
    path: Path, model: ModelConfig, max_rank: int = 256, dtype: torch.dtype = torch.float32,
    checksum: str | None = None, data: bytearray | memoryview | None = None, keep_bf16: bool = False,
) -> ParsedAdapter:
    """Parse and validate the PEFT dir ``path`` against ``model``; tensors are cast to ``dtype``.
    ``checksum``: the weights file's sha256 if the caller has just verified it (else it is hashed);
    ``data``: the weights file's bytes if the caller has read them (they are not read again).
    ``keep_bf16``: the LoRA factors of a plain adapter (A and B only, all bf16 in the file) stay bf16
    (views of ``data``) when ``dtype`` is float32 or bfloat16: exact in either, so the pool's writer
    casts them as it copies them (kernels/page_rows.py) and the host holds half the bytes.

    Raises InvalidAdapter (malformed or unsupported) or AdapterIncompatible (does not fit ``model``
    or exceeds ``max_rank``); messages name the offending field, module, layer or tensor.
    """
    path = Path(path)
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    check_adapter_files(names)
    config_raw = _read_config(path / CONFIG_NAME)
    with _Source(path / WEIGHTS_NAME, data) as src:
        plan = load_plan(config_raw, src.header(), src.size, model, max_rank)
        keep = (keep_bf16 and plan.plain and plan.source_dtype == torch.bfloat16
                and dtype in (torch.float32, torch.bfloat16))
        weights, base_layers, full = _read_tensors(src, plan, torch.bfloat16 if keep else dtype)
    if checksum is None:
        checksum = sha256_file(path / WEIGHTS_NAME) if data is None else hashlib.sha256(data).hexdigest()
    parsed = ParsedAdapter(config=plan.config, weights=weights, checksum=checksum, base_layers=base_layers,
                           copies=full, vocab_size=plan.model.vocab_size, source_dtype=plan.source_dtype)
    logger.info(
        "parsed adapter %s: %d modules, ranks %s, %d bytes",
        path, len(weights), parsed.ranks, parsed.nbytes,
        extra={"adapter_path": str(path), "checksum": parsed.checksum},
    )
    return parsed


def _read_tensors(src: _Source, plan: LoadPlan, dtype: torch.dtype) -> tuple[
        dict[tuple[int, str], LoraWeights], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The plan's tensors: LoRA factors in ``dtype`` (one read when they share a dtype), DoRA
    magnitudes in float32, saved base layers and full copies in ``dtype``."""
    bulk = _read_all(src, [e for m in plan.modules for e in (m.a, m.b)], dtype)

    def read(entry: TensorEntry, layer: int, name: str, part: str, to: torch.dtype = dtype) -> torch.Tensor:
        if bulk is not None and to == dtype and entry.name in bulk:
            return bulk[entry.name]
        return _read_tensor(src, entry, layer, name, part, to)

    weights = {m.key: LoraWeights(
        a=read(m.a, *m.key, A), b=read(m.b, *m.key, B), rank=m.rank, scale=m.scale,
        magnitude=None if m.magnitude is None else read(m.magnitude, *m.key, MAGNITUDE, torch.float32))
        for m in plan.modules}
    base_layers = {name: read(e, layer, name, BASE_LAYER) for layer, name, e in plan.base_layers}
    full = {name: read(e, layer, name, COPY) for layer, name, e in plan.copies}
    return weights, base_layers, full


class _Source:
    """The weights file's bytes by offset: from ``data`` if the caller read them (views, no copy),
    else from the open file (a new buffer per read)."""

    def __init__(self, path: Path, data: bytearray | memoryview | None) -> None:
        self._data = None if data is None else memoryview(data)
        self._file = open(path, "rb") if data is None else None  # noqa: SIM115 - closed by __exit__
        self.size = len(data) if data is not None else os.fstat(self._file.fileno()).st_size

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def header(self) -> bytes:
        if self._data is not None:
            return header_bytes(self._data, WEIGHTS_NAME)
        return file_header_bytes(self._file, self.size, WEIGHTS_NAME)

    def read(self, begin: int, end: int) -> memoryview | bytearray | None:
        """Bytes ``begin:end`` (None if the file ends before ``end``)."""
        if self._data is not None:
            return self._data[begin:end] if end <= len(self._data) else None
        buf = bytearray(end - begin)
        self._file.seek(begin)
        return buf if self._file.readinto(buf) == len(buf) else None


def _read_config(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_NAME} is {size} bytes; the limit is {MAX_CONFIG_BYTES}",
                             param=CONFIG_NAME)
    return path.read_bytes()


def _floats(buf: memoryview | bytearray, dtype: torch.dtype) -> torch.Tensor:
    """``buf`` as a flat tensor of ``dtype``: a view, or a copy if it is not aligned to ``dtype``."""
    if not len(buf):
        return torch.empty(0, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=dtype)
    return flat if flat.data_ptr() % dtype.itemsize == 0 else flat.clone()


def _read_tensor(src: _Source, e: TensorEntry, layer: int, name: str, side: str,
                 dtype: torch.dtype) -> torch.Tensor:
    """One checked tensor from the weights file, cast to ``dtype``; refused if it holds NaN/Inf
    (naming it, and whether the file or the cast to ``dtype`` is at fault)."""
    buf = src.read(e.begin, e.end)
    if buf is None:
        raise InvalidAdapter(f"{WEIGHTS_NAME} is corrupt or truncated: tensor {e.name!r} ends past the end "
                             "of the file", param=WEIGHTS_NAME)
    src_t = _floats(buf, TORCH_DTYPES[e.dtype]).reshape(e.shape)
    out = src_t.to(dtype).contiguous()
    if not _finite(out):
        what = "contains NaN or Inf values" if not _finite(src_t) else f"overflows when cast to {dtype}"
        raise InvalidAdapter(f"tensor {tensor_key(layer, name, side)} {what}", param=WEIGHTS_NAME)
    return out


def _read_all(src: _Source, entries: list[TensorEntry], dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """``entries`` (the LoRA factors: nearly all of a file's bytes) with one read, one cast to ``dtype``
    (none if they are ``dtype`` already) and one finiteness check for the span they cover, as views of
    that one tensor; None when they differ in dtype, are not aligned to it, or the span is not all
    finite (bytes of other tensors may lie in it): the caller then reads each with ``_read_tensor``,
    which names a bad one. Per tensor, the read, cast and check were ~5 ms of a q,k,v,o adapter's
    240 tensors."""
    if not entries or len({e.dtype for e in entries}) != 1:
        return None
    stored = TORCH_DTYPES[entries[0].dtype]
    item, lo, hi = stored.itemsize, min(e.begin for e in entries), max(e.end for e in entries)
    if any((e.begin - lo) % item or (e.end - e.begin) % item for e in entries):  # then hi - lo too
        return None
    buf = src.read(lo, hi)
    if buf is None:
        return None
    flat = _floats(buf, stored).to(dtype)
    if not _finite(flat):
        return None
    base = flat.storage_offset()  # one op per tensor, not a slice and a view
    return {e.name: flat.as_strided(e.shape, _strides(e.shape), base + (e.begin - lo) // item)
            for e in entries}


@functools.lru_cache(maxsize=256)
def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A contiguous tensor's strides (in elements); an adapter's 240 factors have a few shapes."""
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: one pass over its bits in C where the kernels are built (torch's
    reductions over a bf16 adapter took longer than reading it), else torch's min and max."""
    if t.numel() == 0:
        return True
    code = _FINITE_CODES.get(t.dtype)
    lib = _native() if code is not None and t.is_contiguous() and t.device.type == "cpu" else None
    if lib is not None:
        return bool(lib.all_finite(t.data_ptr(), t.numel(), code))
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def _native() -> Any:
    from kernels.native_lib import library  # the kernels build lazily; the store needs no compiler

    return library()
