"""Load a PEFT LoRA adapter directory into host tensors, refusing anything we cannot serve exactly.

A PEFT dir holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys like
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (older PEFT inserts the adapter
name: ``...lora_A.default.weight``). Weights are only read as safetensors: pickled ``.bin`` files
are refused because unpickling runs arbitrary code.

Reading is lazy: the safetensors header is parsed and every check that needs only names, dtypes and
shapes (modules, layers, ranks against the config and the base model) runs before any tensor byte
is read; then tensors are read one at a time, by offset, into their own buffers. Peak memory is
the parsed adapter plus one tensor, not the file two or three times over. Plain reads, not mmap:
a store file truncated under a mapping would kill the process with SIGBUS.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapter_store.fsio import sha256_file
from adapter_store.peft_config import (
    MODULE_PARENTS,
    LoraConfigInfo,
    parse_adapter_config,
    with_targets,
)
from adapter_store.safetensors_header import TensorEntry, read_header
from server.errors import AdapterIncompatible, InvalidAdapter
from server.model_config import ModelConfig

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "LoraConfigInfo",
    "LoraWeights",
    "ParsedAdapter",
    "check_adapter_files",
    "load_peft_adapter",
    "parse_adapter_config",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is ~1 KB
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_MODULE_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<name>\w+)$")


@dataclass(frozen=True)
class LoraWeights:
    """One (layer, module)'s LoRA factors: ``delta_W = scale * b @ a`` (shape ``[out, in]``)."""

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    rank: int
    scale: float


@dataclass(frozen=True)
class ParsedAdapter:
    """A validated adapter in host memory. ``checksum`` is the sha256 hex of the weights file."""

    config: LoraConfigInfo
    weights: dict[tuple[int, str], LoraWeights]
    checksum: str
    source_dtype: torch.dtype | None = None  # the one dtype of its tensors in the file (None: mixed)

    @property
    def nbytes(self) -> int:
        """Host bytes held by all A and B tensors."""
        return sum(w.a.nbytes + w.b.nbytes for w in self.weights.values())

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
        raise InvalidAdapter(f"{WEIGHTS_NAME} is missing")
    if CONFIG_NAME not in names:
        raise InvalidAdapter(f"{CONFIG_NAME} is missing")


def load_peft_adapter(
    path: Path, model: ModelConfig, max_rank: int = 256, dtype: torch.dtype = torch.float32,
    checksum: str | None = None,
) -> ParsedAdapter:
    """Parse and validate the PEFT dir ``path`` against ``model``; tensors are cast to ``dtype``.
    ``checksum``: the weights file's sha256 if the caller has just verified it (else it is hashed).

    Raises InvalidAdapter (malformed or unsupported) or AdapterIncompatible (does not fit ``model``
    or exceeds ``max_rank``); messages name the offending field, module, layer or tensor.
    """
    path = Path(path)
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    check_adapter_files(names)
    config = parse_adapter_config(_read_json(path / CONFIG_NAME))
    targets = config.resolve(model)
    config = with_targets(config, {name for _, name in targets})
    _check_ranks(targets, max_rank)
    pairs = _pair_tensors(read_header(path / WEIGHTS_NAME, WEIGHTS_NAME), model)
    _check_coverage(set(pairs), set(targets))
    shapes = model.linear_shapes()
    for (layer, name), (rank, _) in sorted(targets.items()):
        _check_shapes(layer, name, *pairs[(layer, name)], rank, shapes[name])
    weights = {}
    with open(path / WEIGHTS_NAME, "rb") as f:
        for (layer, name), (rank, alpha) in sorted(targets.items()):
            a, b = (_read_tensor(f, e, layer, name, side, dtype)
                    for side, e in zip("AB", pairs[(layer, name)], strict=True))
            weights[(layer, name)] = LoraWeights(a=a, b=b, rank=rank, scale=config.scale_for(rank, alpha))
    checksum = checksum or sha256_file(path / WEIGHTS_NAME)
    dtypes = {_TORCH_DTYPES[e.dtype] for pair in pairs.values() for e in pair}
    parsed = ParsedAdapter(config=config, weights=weights, checksum=checksum,
                           source_dtype=dtypes.pop() if len(dtypes) == 1 else None)
    logger.info(
        "parsed adapter %s: %d modules, ranks %s, %d bytes",
        path, len(weights), parsed.ranks, parsed.nbytes,
        extra={"adapter_path": str(path), "checksum": parsed.checksum},
    )
    return parsed


def _check_ranks(targets: dict[tuple[int, str], tuple[int, float]], max_rank: int) -> None:
    for (layer, name), (rank, _) in sorted(targets.items()):
        if rank > max_rank:
            raise AdapterIncompatible(
                f"{name} of layer {layer} has rank r={rank}, above this server's max_rank={max_rank}",
                param="r",
            )


def _read_json(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_NAME} is {size} bytes; the limit is {MAX_CONFIG_BYTES}",
                             param=CONFIG_NAME)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidAdapter(f"{CONFIG_NAME} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidAdapter(f"{CONFIG_NAME} is not valid JSON: {exc}") from exc


def _read_tensor(f: Any, e: TensorEntry, layer: int, name: str, side: str,
                 dtype: torch.dtype) -> torch.Tensor:
    """One checked tensor from the open weights file, cast to ``dtype``; refused if it holds NaN/Inf
    (naming it, and whether the file or the cast to ``dtype`` is at fault)."""
    buf = bytearray(e.end - e.begin)
    f.seek(e.begin)
    if f.readinto(buf) != len(buf):
        raise InvalidAdapter(f"{WEIGHTS_NAME} is corrupt or truncated: tensor {e.name!r} ends past the end "
                             "of the file", param=WEIGHTS_NAME)
    stored = _TORCH_DTYPES[e.dtype]
    src = (torch.frombuffer(buf, dtype=stored) if buf else torch.empty(0, dtype=stored)).reshape(e.shape)
    out = src.to(dtype).contiguous()
    if not _finite(out):
        what = "contains NaN or Inf values" if not _finite(src) else f"overflows when cast to {dtype}"
        raise InvalidAdapter(f"tensor {_key(layer, name, side)} {what}", param=WEIGHTS_NAME)
    return out


def _key(layer: int, name: str, ab: str) -> str:
    return f"base_model.model.model.layers.{layer}.{MODULE_PARENTS[name]}.{name}.lora_{ab}.weight"


def _pair_tensors(
    tensors: dict[str, TensorEntry], model: ModelConfig
) -> dict[tuple[int, str], tuple[TensorEntry, TensorEntry]]:
    """Group tensors by (layer, module); raise on keys that are not LoRA A/B of a known module."""
    found: dict[tuple[int, str], dict[str, TensorEntry]] = {}
    for key, tensor in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            if "embed_tokens" in key or "lm_head" in key:
                raise InvalidAdapter(f"tensor {key!r} targets embed_tokens/lm_head, which is not supported")
            raise InvalidAdapter(f"unexpected tensor {key!r} in {WEIGHTS_NAME} (not a LoRA A/B weight)")
        module = m.group("module")
        mm = _MODULE_RE.match(module)
        if mm is None or MODULE_PARENTS.get(mm.group("name")) != mm.group("parent"):
            raise AdapterIncompatible(f"tensor {key!r}: the base model has no module {module!r}")
        layer = int(mm.group("layer"))
        if layer >= model.num_layers:
            raise AdapterIncompatible(
                f"tensor {key!r} is for layer {layer} but the base model has {model.num_layers} layers"
            )
        slot = found.setdefault((layer, mm.group("name")), {})
        if m.group("ab") in slot:
            raise InvalidAdapter(f"duplicate lora_{m.group('ab')} tensor for {module!r} ({key!r})")
        slot[m.group("ab")] = tensor
    for (layer, name), ab in found.items():
        for side in "AB":
            if side not in ab:
                missing = _key(layer, name, side)
                raise InvalidAdapter(f"{name} of layer {layer} has no lora_{side} tensor ({missing})")
    return {k: (v["A"], v["B"]) for k, v in found.items()}


def _check_coverage(present: set[tuple[int, str]], targeted: set[tuple[int, str]]) -> None:
    missing = sorted(targeted - present)
    if missing:
        layer, name = missing[0]
        raise InvalidAdapter(
            f"adapter_config targets {name} of layer {layer} but {WEIGHTS_NAME} has no weights for it "
            f"({len(missing)} targeted module(s) missing, e.g. {_key(layer, name, 'A')})"
        )
    stray = sorted(present - targeted)
    if stray:
        layer, name = stray[0]
        raise InvalidAdapter(
            f"{WEIGHTS_NAME} has weights for {name} of layer {layer} that adapter_config does not "
            f"target ({len(stray)} such module(s))"
        )


def _check_shapes(
    layer: int, name: str, a: TensorEntry, b: TensorEntry, rank: int, in_out: tuple[int, int]
) -> None:
    in_f, out_f = in_out
    for side, t in (("A", a), ("B", b)):
        if t.dtype not in _TORCH_DTYPES:
            raise InvalidAdapter(
                f"tensor {_key(layer, name, side)} has dtype {t.dtype}; expected F32, F16 or BF16 (float32, "
                "float16 or bfloat16)", param=WEIGHTS_NAME)
        if len(t.shape) != 2:
            raise InvalidAdapter(f"tensor {_key(layer, name, side)} has shape {list(t.shape)}; expected 2-D",
                                 param=WEIGHTS_NAME)
    if a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
        raise AdapterIncompatible(
            f"{name} of layer {layer}: expected lora_A [r, {in_f}] and lora_B [{out_f}, r] for the base "
            f"model, got lora_A {list(a.shape)} and lora_B {list(b.shape)}", param=WEIGHTS_NAME
        )
    if a.shape[0] != rank:
        raise InvalidAdapter(
            f"{name} of layer {layer}: adapter_config gives rank {rank} (expected lora_A [{rank}, {in_f}], "
            f"lora_B [{out_f}, {rank}]) but got lora_A {list(a.shape)} and lora_B {list(b.shape)}", param="r"
        )


def _finite(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())
