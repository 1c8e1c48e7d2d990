"""The whole embed_tokens / lm_head weights a PEFT adapter may carry, and the vocabulary they imply.

Two kinds (see adapter_store/peft_keys.py): the base layer PEFT saves beside LoRA on those modules
(it loads it back into the base model, so it matters when it differs from the base's: an adapter
trained on other weights or a resized vocabulary), and the trained full copies of
``modules_to_save``. Both are ``[vocab, hidden]``; ``vocab`` may exceed the base's when tokens were
added (``resize_token_embeddings``), and then every embed_tokens/lm_head tensor of the adapter,
LoRA factors included, has that many rows or columns.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from adapter_store.peft_keys import BASE_LAYER, COPY, WEIGHTS_NAME, tensor_key
from adapter_store.safetensors_header import TensorEntry, read_header
from server.errors import AdapterIncompatible, InvalidAdapter
from server.model_config import MODEL_LAYER, MODEL_MODULES, ModelConfig

Found = dict[tuple[int, str], dict[str, TensorEntry]]  # as the weights file's header describes them
_FLOAT_DTYPES = ("F32", "F16", "BF16")


def adapter_vocab(found: Found, model: ModelConfig) -> int:
    """The vocabulary of the adapter's whole embed_tokens/lm_head weights (the base's if it has none):
    all must agree, be at least the base's and have the base's hidden size."""
    sizes = {}
    for (layer, name), parts in found.items():
        for part in (BASE_LAYER, COPY):
            t = parts.get(part)
            if t is None or layer != MODEL_LAYER:
                continue
            key = tensor_key(layer, name, part)
            if len(t.shape) != 2 or t.shape[1] != model.hidden_size or t.shape[0] < model.vocab_size:
                raise AdapterIncompatible(
                    f"tensor {key} has shape {list(t.shape)}; expected [vocab, {model.hidden_size}] with "
                    f"vocab at least the base model's {model.vocab_size}", param=WEIGHTS_NAME)
            if t.dtype not in _FLOAT_DTYPES:
                raise InvalidAdapter(f"tensor {key} has dtype {t.dtype}; expected F32, F16 or BF16",
                                     param=WEIGHTS_NAME)
            sizes[key] = t.shape[0]
    if len(set(sizes.values())) > 1:
        raise AdapterIncompatible(f"the adapter's embedding/head weights disagree on the vocabulary: {sizes}",
                                  param=WEIGHTS_NAME)
    return next(iter(sizes.values()), model.vocab_size)


def with_vocab(model: ModelConfig, vocab: int) -> ModelConfig:
    """``model`` with the adapter's vocabulary (the shapes its embed_tokens/lm_head tensors have)."""
    return model if vocab == model.vocab_size else dataclasses.replace(model, vocab_size=vocab)


def check_base_layers_and_copies(found: Found, copies: tuple[str, ...]) -> None:
    """A base layer must belong to a LoRA module of the adapter; every copy ``modules_to_save`` asks
    for must be in the file, and no other."""
    for name in MODEL_MODULES:
        parts = found.get((MODEL_LAYER, name), {})
        if BASE_LAYER in parts and "A" not in parts:
            raise InvalidAdapter(f"tensor {tensor_key(MODEL_LAYER, name, BASE_LAYER)} belongs to no LoRA "
                                 "module of the adapter", param=WEIGHTS_NAME)
        key = tensor_key(MODEL_LAYER, name, COPY)
        if COPY in parts and name not in copies:
            raise InvalidAdapter(f"tensor {key} is a full copy of {name} but adapter_config's "
                                 "modules_to_save does not name it", param="modules_to_save")
        if name in copies and COPY not in parts:
            raise InvalidAdapter(f"adapter_config's modules_to_save names {name} but {key} is missing",
                                 param="modules_to_save")


def saved_vocab(weights_file: Path, name: str) -> int | None:
    """Rows of the full copy of ``name`` in a safetensors file, from its header only (no tensor data):
    for sizing an adapter still on disk. None if the file has no such tensor."""
    key = tensor_key(MODEL_LAYER, name, COPY)
    entries = read_header(weights_file, weights_file.name)
    entry = entries.get(key) or entries.get(key.replace(".weight", ".modules_to_save.default.weight"))
    return entry.shape[0] if entry is not None and entry.shape else None
