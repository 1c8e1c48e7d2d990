"""What a PEFT adapter's config and weights-file header say, checked against the base model: the plan
of which tensor to read for each (layer, module), made before any tensor byte is read.

Why apart from the reading (adapter_store/peft_format.py), and cached: every check here needs only
names, dtypes and shapes, and the adapters of one family (one base, one recipe, one rank) have the
same config and the same header bytes. Parsing a q,k,v,o adapter's 240-entry header, resolving its
targets (~400 regex matches) and checking its 120 modules cost ~8 ms of each cold load. A plan is
cached by the exact bytes of the config and the header, the file's size, the model and the rank
limit, i.e. by everything it is computed from: a hit is the answer the checks would give for any
file with those bytes. Refusals are not cached (each raises again, naming the same field).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch

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
from adapter_store.safetensors_header import TensorEntry, parse_header
from server.errors import AdapterIncompatible, InvalidAdapter
from server.model_config import MODEL_LAYER, ModelConfig

CONFIG_NAME = "adapter_config.json"
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
PLAN_CACHE_SIZE = 64  # distinct (config, header) pairs; a plan is ~100 KB for 120 modules
Key = tuple[int, str]


@dataclass(frozen=True)
class ModulePlan:
    """One targeted (layer, module): its rank and scale, and the tensors holding its factors."""

    key: Key
    rank: int
    scale: float
    a: TensorEntry
    b: TensorEntry
    magnitude: TensorEntry | None  # DoRA


@dataclass(frozen=True)
class LoadPlan:
    """A checked adapter, tensors not read: ``model`` is the base with the adapter's vocabulary;
    ``base_layers`` / ``copies``: ``(layer, name, tensor)`` of saved base layers and full copies;
    ``source_dtype``: the one dtype of all the file's tensors (None: mixed)."""

    config: LoraConfigInfo
    model: ModelConfig
    modules: tuple[ModulePlan, ...]  # by (layer, module)
    base_layers: tuple[tuple[int, str, TensorEntry], ...]
    copies: tuple[tuple[int, str, TensorEntry], ...]
    source_dtype: torch.dtype | None

    @property
    def plain(self) -> bool:
        """LoRA factors only: nothing is computed from the file's values at load (server/adapter_prep.py)."""
        return not self.base_layers and not self.copies and all(m.magnitude is None for m in self.modules)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def load_plan(config_raw: bytes, header_raw: bytes, size: int, model: ModelConfig, max_rank: int) -> LoadPlan:
    """The plan of the adapter whose config file holds ``config_raw`` and whose weights file (``size``
    bytes) has the JSON header ``header_raw``. Raises InvalidAdapter (malformed or unsupported) or
    AdapterIncompatible (does not fit ``model`` or exceeds ``max_rank``)."""
    config = parse_adapter_config(parse_config_json(config_raw))
    targets = config.resolve(model)
    config = with_targets(config, {name for _, name in targets})
    _check_ranks(targets, max_rank)
    found = _group_entries(parse_header(header_raw, size, WEIGHTS_NAME), model.num_layers)
    model = with_vocab(model, adapter_vocab(found, model))  # added tokens: embed/lm_head are wider
    _check_coverage({k for k, parts in found.items() if set(parts) - {COPY}}, set(targets))
    shapes = model.lora_shapes()
    modules = []
    for (layer, name), (rank, alpha) in sorted(targets.items()):
        parts = found[(layer, name)]
        _check_shapes(layer, name, *_ab(layer, name, parts), rank, shapes[name])
        _check_magnitude(layer, name, parts.get(MAGNITUDE), config.use_dora, shapes[name][1])
        modules.append(ModulePlan((layer, name), rank, config.scale_for(rank, alpha), parts[A], parts[B],
                                  parts.get(MAGNITUDE)))
    copies = config.copies(model)
    check_base_layers_and_copies(found, copies)
    base_layers = tuple((layer, name, parts[BASE_LAYER]) for (layer, name), parts in sorted(found.items())
                        if BASE_LAYER in parts)
    full = tuple((MODEL_LAYER, name, found[(MODEL_LAYER, name)][COPY]) for name in copies)
    dtypes = {TORCH_DTYPES.get(e.dtype) for parts in found.values() for e in parts.values()}
    return LoadPlan(config, model, tuple(modules), base_layers, full,
                    dtypes.pop() if len(dtypes) == 1 else None)


def parse_config_json(raw: bytes) -> dict[str, Any]:
    """``adapter_config.json``'s bytes as JSON; raise InvalidAdapter naming the file."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidAdapter(f"{CONFIG_NAME} is not UTF-8 text: {exc}", param=CONFIG_NAME) from exc
    except json.JSONDecodeError as exc:
        raise InvalidAdapter(f"{CONFIG_NAME} is not valid JSON: {exc}", param=CONFIG_NAME) from exc


def _check_ranks(targets: dict[tuple[int, str], tuple[int, float]], max_rank: int) -> None:
    for (layer, name), (rank, _) in sorted(targets.items()):
        if rank > max_rank:
            raise AdapterIncompatible(
                f"{site(layer, name)} has rank r={rank}, above this server's max_rank={max_rank}",
                param="r",
            )


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
            key = tensor_key(layer, name, side)
            raise InvalidAdapter(f"{site(layer, name)} has no lora_{side} tensor ({key})", param=WEIGHTS_NAME)
    return parts[A], parts[B]


def _check_magnitude(layer: int, name: str, m: TensorEntry | None, use_dora: bool, out: int) -> None:
    key = tensor_key(layer, name, MAGNITUDE)
    if m is None and use_dora:
        raise InvalidAdapter(f"adapter_config has use_dora=true but {key} is missing", param="use_dora")
    if m is not None and not use_dora:
        raise InvalidAdapter(f"tensor {key} is a DoRA magnitude but adapter_config has use_dora=false",
                             param="use_dora")
    if m is not None and (m.dtype not in TORCH_DTYPES or tuple(m.shape) != (out,)):
        raise InvalidAdapter(f"tensor {key} has shape {list(m.shape)} ({m.dtype}); expected [{out}] floats",
                             param=WEIGHTS_NAME)


def _check_coverage(present: set[tuple[int, str]], targeted: set[tuple[int, str]]) -> None:
    missing = sorted(targeted - present)
    if missing:
        layer, name = missing[0]
        raise InvalidAdapter(
            f"adapter_config targets {site(layer, name)} but {WEIGHTS_NAME} has no weights for it "
            f"({len(missing)} targeted module(s) missing, e.g. {tensor_key(layer, name, 'A')})",
            param=WEIGHTS_NAME,
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
        if t.dtype not in TORCH_DTYPES:
            raise InvalidAdapter(
                f"tensor {tensor_key(layer, name, side)} has dtype {t.dtype}; expected F32, F16 or BF16 "
                "(float32, float16 or bfloat16)", param=WEIGHTS_NAME)
        if len(t.shape) != 2:
            raise InvalidAdapter(
                f"tensor {tensor_key(layer, name, side)} has shape {list(t.shape)}; expected 2-D",
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
