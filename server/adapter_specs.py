"""An adapter's shape in the pool (``AdapterSpec``: each module's rank, widths and kind), derived
either from its config and weights-file header alone (before any weight is read) or from its parsed
weights. Reads no tensor data."""

from __future__ import annotations

import json
from pathlib import Path

from adapter_store.peft_embeddings import saved_vocab
from adapter_store.peft_format import CONFIG_NAME, WEIGHTS_NAME, ParsedAdapter, parse_adapter_config
from server.adapter_prep import copy_shape
from server.adapter_residency import AdapterSpec, ModuleSpec
from server.errors import AdapterIncompatible, InvalidAdapter
from server.model_config import EMBED, MODEL_LAYER, ModelConfig


def spec_from_config(uid: int, name: str, path: Path, model: ModelConfig) -> AdapterSpec | None:
    """The shape of the adapter stored in ``path`` from its config (and its weights file's header for
    the vocabulary of full copies), no weights read: for listing adapters still on disk and checking
    their requests' token ids. ``spec_from_parsed`` replaces it once the weights are read (it differs
    if PEFT's saved base embedding/head is not the base model's, or if the rows are stored in bf16:
    this one counts the model dtype's pages, at most as many). None if unreadable."""
    try:
        config = parse_adapter_config(json.loads((path / CONFIG_NAME).read_text()))
        targets = config.resolve(model)
        copies = {m: saved_vocab(path / WEIGHTS_NAME, m) for m in config.copies(model)}
    except (OSError, ValueError, InvalidAdapter, AdapterIncompatible):
        return None
    shapes = model.lora_shapes()
    modules = {key: ModuleSpec(rank, config.scale_for(rank, alpha), *shapes[key[1]], dora=config.use_dora,
                               a_transposed=key[1] == EMBED)
               for key, (rank, alpha) in targets.items()}
    for module, vocab in copies.items():
        rank, k, n = copy_shape(module, vocab or model.vocab_size, model.hidden_size)
        modules[(MODEL_LAYER, module)] = ModuleSpec(rank, 1.0, k, n, a_transposed=module == EMBED,
                                                    replace=True)
    return AdapterSpec(uid=uid, name=name, modules=modules)


def spec_from_parsed(uid: int, name: str, parsed: ParsedAdapter, dtype: str | None = None) -> AdapterSpec:
    """The exact shape of a parsed adapter made ready for the base (server/adapter_prep.py), its
    rows stored in ``dtype`` (None: the model's; server/adapter_storage.py chooses)."""
    return AdapterSpec(uid=uid, name=name, modules={
        key: ModuleSpec(w.rank, w.scale, w.a.shape[1], w.b.shape[0], dora=w.magnitude is not None,
                        a_transposed=key[1] == EMBED, replace=w.replace)
        for key, w in parsed.weights.items()
    }, dtype=dtype)
