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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapter_store.fsio import sha256_file
from adapter_store.peft_config import LoraConfigInfo, parse_adapter_config, with_targets
from adapter_store.peft_embeddings import adapter_vocab, check_base_layers_and_copies, with_vocab
from adapter_store.peft_keys import (
    BASE_LAYER,
    COPY,
    MAGNITUDE,
    WEIGHTS_NAME,
    A,
    B,
    parse_key,
    site,
    tensor_key,
)
from adapter_store.safetensors_header import TensorEntry, read_header
from server.errors import AdapterIncompatible, InvalidAdapter
from server.model_config import MODEL_LAYER, ModelConfig

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

CONFIG_NAME = "adapter_config.json"
# An adapter's own tokenizer (saved beside it when tokens were added): a fast tokenizer's files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is ~1 KB
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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

    @property
    def nbytes(self) -> int:
        """Host bytes held by all tensors."""
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
    found = _group_entries(read_header(path / WEIGHTS_NAME, WEIGHTS_NAME), model.num_layers)
    model = with_vocab(model, adapter_vocab(found, model))  # added tokens: embed/lm_head are wider
    _check_coverage({k for k, parts in found.items() if set(parts) - {COPY}}, set(targets))
    shapes = model.lora_shapes()
    for (layer, name), (rank, _) in sorted(targets.items()):
        parts = found[(layer, name)]
        _check_shapes(layer, name, *_ab(layer, name, parts), rank, shapes[name])
        _check_magnitude(layer, name, parts.get(MAGNITUDE), config.use_dora, shapes[name][1])
    copies = config.copies(model)
    check_base_layers_and_copies(found, copies)
    weights = {}
    with open(path / WEIGHTS_NAME, "rb") as f:
        bulk = _read_all(f, [found[key][part] for key in targets for part in (A, B)], dtype)

        def read(layer: int, name: str, part: str, to: torch.dtype = dtype) -> torch.Tensor:
            entry = found[(layer, name)][part]
            if bulk is not None and to == dtype and entry.name in bulk:
                return bulk[entry.name]
            return _read_tensor(f, entry, layer, name, part, to)

        for (layer, name), (rank, alpha) in sorted(targets.items()):
            dora = MAGNITUDE in found[(layer, name)]
            weights[(layer, name)] = LoraWeights(
                a=read(layer, name, A), b=read(layer, name, B), rank=rank,
                scale=config.scale_for(rank, alpha),
                magnitude=read(layer, name, MAGNITUDE, torch.float32) if dora else None)
        base_layers = {name: read(layer, name, BASE_LAYER) for (layer, name), parts in sorted(found.items())
                       if BASE_LAYER in parts}
        full = {name: read(MODEL_LAYER, name, COPY) for name in copies}
    checksum = checksum or sha256_file(path / WEIGHTS_NAME)
    dtypes = {_TORCH_DTYPES.get(e.dtype) for parts in found.values() for e in parts.values()}
    parsed = ParsedAdapter(config=config, weights=weights, checksum=checksum, base_layers=base_layers,
                           copies=full, vocab_size=model.vocab_size,
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
                f"{site(layer, name)} has rank r={rank}, above this server's max_rank={max_rank}",
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
        raise InvalidAdapter(f"{CONFIG_NAME} is not UTF-8 text: {exc}", param=CONFIG_NAME) from exc
    except json.JSONDecodeError as exc:
        raise InvalidAdapter(f"{CONFIG_NAME} is not valid JSON: {exc}", param=CONFIG_NAME) from exc


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


def _read_all(f: Any, entries: list[TensorEntry], dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """``entries`` (the LoRA factors: nearly all of a file's bytes) with one read, one cast to ``dtype``
    and one finiteness check for the span they cover, as views of that one tensor; None when they
    differ in dtype, are not aligned to it, or the span is not all finite (bytes of other tensors may
    lie in it): the caller then reads each with ``_read_tensor``, which names a bad one. Per tensor,
    the read, cast and check were ~5 ms of a q,k,v,o adapter's 240 tensors."""
    if not entries or len({e.dtype for e in entries}) != 1:
        return None
    stored = _TORCH_DTYPES[entries[0].dtype]
    item, lo, hi = stored.itemsize, min(e.begin for e in entries), max(e.end for e in entries)
    if any((e.begin - lo) % item or (e.end - e.begin) % item for e in entries):  # then hi - lo too
        return None
    buf = bytearray(hi - lo)
    f.seek(lo)
    if f.readinto(buf) != len(buf):
        return None
    flat = torch.frombuffer(buf, dtype=stored).to(dtype) if buf else torch.empty(0, dtype=dtype)
    if not _finite(flat):
        return None
    return {e.name: flat[(e.begin - lo) // item:(e.end - lo) // item].view(e.shape) for e in entries}


def _key(layer: int, name: str, part: str) -> str:
    return tensor_key(layer, name, part)


Found = dict[tuple[int, str], dict[str, TensorEntry]]


def _group_entries(entries: dict[str, TensorEntry], num_layers: int) -> Found:
    """Tensors by (layer, module) and part (peft_keys); raise on keys that are not a known part."""
    found: Found = {}
    for key, entry in entries.items():
        layer, name, part = parse_key(key, num_layers)
        slot = found.setdefault((layer, name), {})
        if part in slot:
            raise InvalidAdapter(f"duplicate tensor for {part} of {site(layer, name)} ({key!r})",
                                 param=WEIGHTS_NAME)
        slot[part] = entry
    return found


def _ab(layer: int, name: str, parts: dict[str, TensorEntry]) -> tuple[TensorEntry, TensorEntry]:
    for side in (A, B):
        if side not in parts:
            key = _key(layer, name, side)
            raise InvalidAdapter(f"{site(layer, name)} has no lora_{side} tensor ({key})", param=WEIGHTS_NAME)
    return parts[A], parts[B]


def _check_magnitude(layer: int, name: str, m: TensorEntry | None, use_dora: bool, out: int) -> None:
    key = _key(layer, name, MAGNITUDE)
    if m is None and use_dora:
        raise InvalidAdapter(f"adapter_config has use_dora=true but {key} is missing", param="use_dora")
    if m is not None and not use_dora:
        raise InvalidAdapter(f"tensor {key} is a DoRA magnitude but adapter_config has use_dora=false",
                             param="use_dora")
    if m is not None and (m.dtype not in _TORCH_DTYPES or tuple(m.shape) != (out,)):
        raise InvalidAdapter(f"tensor {key} has shape {list(m.shape)} ({m.dtype}); expected [{out}] floats",
                             param=WEIGHTS_NAME)


def _check_coverage(present: set[tuple[int, str]], targeted: set[tuple[int, str]]) -> None:
    missing = sorted(targeted - present)
    if missing:
        layer, name = missing[0]
        raise InvalidAdapter(
            f"adapter_config targets {site(layer, name)} but {WEIGHTS_NAME} has no weights for it "
            f"({len(missing)} targeted module(s) missing, e.g. {_key(layer, name, 'A')})", param=WEIGHTS_NAME
        )
    stray = sorted(present - targeted)
    if stray:
        layer, name = stray[0]
        raise InvalidAdapter(
            f"{WEIGHTS_NAME} has weights for {site(layer, name)} that adapter_config does not "
            f"target ({len(stray)} such module(s))", param="target_modules"
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
            f"{site(layer, name)}: expected lora_A [r, {in_f}] and lora_B [{out_f}, r] for the base "
            f"model, got lora_A {list(a.shape)} and lora_B {list(b.shape)}", param=WEIGHTS_NAME
        )
    if a.shape[0] != rank:
        raise InvalidAdapter(
            f"{site(layer, name)}: adapter_config gives rank {rank} (expected lora_A [{rank}, {in_f}], "
            f"lora_B [{out_f}, {rank}]) but got lora_A {list(a.shape)} and lora_B {list(b.shape)}", param="r"
        )


def _finite(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())
