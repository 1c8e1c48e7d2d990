"""A parsed adapter made ready for this base model, before it is placed in pages.

* DoRA modules get their scale ``g = m / ||W0 + s B A||`` (server/dora.py).
* The whole embed_tokens / lm_head weights an adapter carries (adapter_store/peft_embeddings.py)
  become modules of the pool like any other, with a ``replace`` flag (their output replaces the
  base layer's) and no new kernel: a copy ``E'`` of the embedding is the embed_tokens site with
  ``A.T = E'`` and ``B = I`` (a row lookup, then the identity), a copy ``W'`` of the head is the
  lm_head site with ``A = I`` and ``B = W'``. When PEFT's saved base layer goes with LoRA on the same
  module the two are one module of rank ``hidden + r``: ``[E' | s A.T] @ [I ; B.T]`` and
  ``[W' | s B] @ [I ; A]``. A base layer bit for bit the base model's own is dropped (on a tied
  base a changed one changes both modules, as PEFT's loading does). The identity
  costs ``hidden^2`` elements (1.3 MB in fp32 for SmolLM2) beside the copy's ``vocab x hidden``.
"""

from __future__ import annotations

import dataclasses

import torch

from adapter_store.peft_format import LoraWeights, ParsedAdapter
from adapter_store.peft_keys import BASE_LAYER, tensor_key
from server.dora import BaseWeights, dora_scale
from server.errors import InvalidAdapter
from server.model_config import EMBED, LM_HEAD, MODEL_LAYER


def prepare_for_base(parsed: ParsedAdapter, base: BaseWeights) -> ParsedAdapter:
    """``parsed`` with DoRA scales computed and embedding/head weights turned into pool modules."""
    weights = {key: w if w.magnitude is None else dataclasses.replace(
                   w, dora_scale=dora_scale(base, *key, w.a, w.b, w.scale, w.magnitude))
               for key, w in parsed.weights.items()}
    for name, weight in _changed_base_layers(parsed, base).items():
        lora = weights.get((MODEL_LAYER, name))
        if lora is not None and lora.magnitude is not None:
            raise InvalidAdapter(f"DoRA on {name} over a base weight other than the base model's "
                                 f"({tensor_key(MODEL_LAYER, name, BASE_LAYER)}) is not supported",
                                 param="use_dora")
        weights[(MODEL_LAYER, name)] = full_copy(name, weight, lora)
    for name, weight in parsed.copies.items():
        weights[(MODEL_LAYER, name)] = full_copy(name, weight, None)
    return dataclasses.replace(parsed, weights=weights, base_layers={}, copies={})


def _changed_base_layers(parsed: ParsedAdapter, base: BaseWeights) -> dict[str, torch.Tensor]:
    """The saved base layers that are not the base model's own, by module. PEFT loads them into the
    base model; when the base ties its head to its embedding, loading one changes both, so the other
    module (if PEFT saved no base layer of its own for it) gets the same weight."""
    changed = {name: w for name, w in parsed.base_layers.items()
               if w.shape[0] != base.config.vocab_size or not base.same_as_base(name, w)}
    if base.config.tie_word_embeddings:
        for name, weight in list(changed.items()):
            partner = LM_HEAD if name == EMBED else EMBED
            if partner not in parsed.base_layers:
                changed[partner] = weight
    return changed


def full_copy(name: str, weight: torch.Tensor, lora: LoraWeights | None) -> LoraWeights:
    """The module computing ``weight``'s layer (``[vocab, hidden]``), plus ``lora``'s term if given."""
    eye = torch.eye(weight.shape[1], dtype=weight.dtype)
    if name == EMBED:  # y = E'[id] (+ s A.T[id] @ B.T)
        a = weight.t() if lora is None else torch.cat([weight.t(), lora.scale * lora.a])
        b = eye if lora is None else torch.cat([eye, lora.b], dim=1)
    else:  # lm_head: y = W' h (+ s B A h)
        a = eye if lora is None else torch.cat([eye, lora.a])
        b = weight if lora is None else torch.cat([weight, lora.scale * lora.b], dim=1)
    return LoraWeights(a=a, b=b, rank=a.shape[0], scale=1.0, replace=True)


def copy_shape(name: str, vocab: int, hidden: int) -> tuple[int, int, int]:
    """``(rank, in_features, out_features)`` of the module ``full_copy`` makes of a copy alone."""
    return (hidden, vocab, hidden) if name == EMBED else (hidden, hidden, vocab)
