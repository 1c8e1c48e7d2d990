"""Read and check a safetensors file's header without reading its tensors. Pure Python, no torch.

Layout (the safetensors spec): 8 bytes little-endian header length ``n``; ``n`` bytes of JSON
mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative
to the byte after the header), plus an optional ``"__metadata__"`` of strings; then the data.
A header that lies (a length past the end of the file, offsets out of range or overlapping, a byte
span that doesn't match ``shape`` x ``dtype``, holes in the data) is refused here with a message
naming the tensor and the field, before any tensor byte is read, so validation costs memory in
proportion to the header, not the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from server.errors import InvalidAdapter

MAX_HEADER_BYTES = 16 * 2**20  # a 7-module, 80-layer adapter's header is ~100 KB
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path, label: str) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors file ``path``, checked against the file's real size.
    ``label`` names the file in messages. Raises InvalidAdapter."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = file_header_bytes(f, size, label)
    return parse_header(raw, size, label)


def file_header_bytes(f: BinaryIO, size: int, label: str) -> bytes:
    """The JSON header of the open safetensors file ``f`` of ``size`` bytes."""
    f.seek(0)
    n = _header_length(f.read(8), size, label)
    raw = f.read(n)
    if len(raw) != n:
        raise _bad(label, f"the file ended within its {n}-byte header")
    return raw


def header_bytes(data: bytes | bytearray | memoryview, label: str) -> bytes:
    """The JSON header of a safetensors file held whole in ``data`` (checked as ``read_header``)."""
    return bytes(data[8 : 8 + _header_length(bytes(data[:8]), len(data), label)])


def _header_length(head: bytes, size: int, label: str) -> int:
    if size < 8:
        raise _bad(label, f"the file is {size} bytes, too short for the 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise _bad(label, f"the header length field says {n} bytes but only {size - 8} follow it")
    if n > MAX_HEADER_BYTES:
        raise _bad(label, f"the header is {n} bytes, over the limit of {MAX_HEADER_BYTES}")
    return n


def _bad(label: str, reason: str) -> InvalidAdapter:
    return InvalidAdapter(f"{label} is corrupt or truncated: {reason}", param=label)


def parse_header(raw: bytes, size: int, label: str) -> dict[str, TensorEntry]:
    """Every tensor the JSON header ``raw`` of a file of ``size`` bytes describes, checked as
    ``read_header`` checks them. Raises InvalidAdapter."""
    def bad(reason: str) -> InvalidAdapter:
        return _bad(label, reason)

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise bad("__metadata__ must map names to strings")
    start = 8 + len(raw)
    entries = {name: _entry(name, spec, start, bad) for name, spec in header.items()}
    _check_layout(sorted(entries.values(), key=lambda e: (e.begin, e.end)), start, size, bad)
    return entries


def _entry(name: str, spec: Any, start: int, bad: Any) -> TensorEntry:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise bad(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad(f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] with begin <= end")
    span = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != span:
        raise bad(f"tensor {name!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but shape "
                  f"{shape} of {dtype} needs {span}")
    return TensorEntry(name, dtype, tuple(shape), start + offsets[0], start + offsets[1])


def _check_layout(entries: list[TensorEntry], start: int, size: int, bad: Any) -> None:
    """The data must be exactly covered, tensor after tensor, and end where the file ends."""
    at = start
    for e in entries:
        if e.begin < at:
            raise bad(f"tensor {e.name!r} overlaps the previous tensor (data_offsets "
                      f"[{e.begin - start}, {e.end - start}])")
        if e.begin > at:
            raise bad(f"a gap of {e.begin - at} bytes precedes tensor {e.name!r}")
        if e.end > size:
            raise bad(f"tensor {e.name!r} ends at byte {e.end - start} of the data but the data is only "
                      f"{size - start} bytes (the file is truncated or the offsets are wrong)")
        at = e.end
    if at != size:
        raise bad(f"{size - at} bytes after the last tensor belong to no tensor")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
