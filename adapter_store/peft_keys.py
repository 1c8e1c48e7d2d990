"""Tensor names of a PEFT LoRA weights file, mapped to (layer, module, part). Pure Python (no torch).

PEFT 0.21 saves, per targeted module (older PEFT inserts the adapter name, ``.default``):

* a linear module of a layer: ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``
  and ``...lora_B.weight``; lm_head likewise: ``base_model.model.lm_head.lora_A.weight``;
* embed_tokens: ``base_model.model.model.embed_tokens.lora_embedding_A`` (``[r, vocab]``) and
  ``...lora_embedding_B`` (``[hidden, r]``): no ``.weight``, and other names than a linear's;
* with ``use_dora``, each module's magnitude vector: ``...q_proj.lora_magnitude_vector``;
* for embed_tokens/lm_head targets, PEFT also saves the base layer's whole weight
  (``...embed_tokens.base_layer.weight``, ``save_embedding_layers="auto"``) and loads it back into
  the base model with the adapter, so it is part of what the adapter computes;
* ``modules_to_save`` (full copies, trained): ``base_model.model.model.embed_tokens.weight``,
  ``base_model.model.lm_head.weight`` (older PEFT: ``...modules_to_save.default.weight``).
"""

from __future__ import annotations

import re

from adapter_store.peft_config import MODEL_KEYS, MODULE_PARENTS
from server.errors import AdapterIncompatible, InvalidAdapter
from server.model_config import EMBED, MODEL_LAYER

WEIGHTS_NAME = "adapter_model.safetensors"  # the file; its refusals name it as their field
# The parts of one module's tensors.
A, B, MAGNITUDE, BASE_LAYER, COPY = "A", "B", "magnitude", "base_layer", "copy"

_KEY_RE = re.compile(
    r"^base_model\.model\.(?P<module>.+?)\.(?P<param>lora_(?:embedding_)?[AB](?:\.default)?(?:\.weight)?"
    r"|lora_magnitude_vector(?:\.default)?(?:\.weight)?|base_layer\.weight|(?:modules_to_save\.default\.)?weight)$"
)
_LAYER_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<name>\w+)$")
_MODEL_MODULES = {key: name for name, key in MODEL_KEYS.items()}


def site(layer: int, name: str) -> str:
    """A module as messages name it: ``q_proj of layer 3``, or ``lm_head``."""
    return name if layer == MODEL_LAYER and name in MODEL_KEYS else f"{name} of layer {layer}"


def tensor_key(layer: int, name: str, part: str) -> str:
    """The name PEFT 0.21 saves a part under, for messages."""
    module = MODEL_KEYS.get(name) if layer == MODEL_LAYER and name in MODEL_KEYS else None
    module = module or f"model.layers.{layer}.{MODULE_PARENTS[name]}.{name}"
    if part == MAGNITUDE:
        param = "lora_magnitude_vector"
    elif part == BASE_LAYER:
        param = "base_layer.weight"
    elif part == COPY:
        param = "weight"
    else:
        param = f"lora_embedding_{part}" if name == EMBED else f"lora_{part}.weight"
    return f"base_model.model.{module}.{param}"


def parse_key(key: str, num_layers: int) -> tuple[int, str, str]:
    """``(layer, module name, part)`` of one tensor name; raises naming what is wrong with it."""
    m = _KEY_RE.match(key)
    if m is None:
        raise InvalidAdapter(f"unexpected tensor {key!r} in {WEIGHTS_NAME} (not a LoRA weight)",
                             param=WEIGHTS_NAME)
    module, param = m.group("module"), m.group("param")
    if module in _MODEL_MODULES:
        layer, name = MODEL_LAYER, _MODEL_MODULES[module]
    else:
        mm = _LAYER_RE.match(module)
        if mm is None or MODULE_PARENTS.get(mm.group("name")) != mm.group("parent"):
            raise AdapterIncompatible(f"tensor {key!r}: the base model has no module {module!r}",
                                      param=WEIGHTS_NAME)
        layer, name = int(mm.group("layer")), mm.group("name")
        if layer >= num_layers:
            raise AdapterIncompatible(
                f"tensor {key!r} is for layer {layer} but the base model has {num_layers} layers",
                param=WEIGHTS_NAME)
    return layer, name, _part(key, name, param)


def _part(key: str, name: str, param: str) -> str:
    if param.startswith("lora_magnitude_vector"):
        return MAGNITUDE
    if param == "base_layer.weight" or param.endswith("weight") and not param.startswith("lora_"):
        if name not in MODEL_KEYS:
            raise InvalidAdapter(f"unexpected tensor {key!r}: only embed_tokens/lm_head have a base layer "
                                 "or a full copy (modules_to_save) in an adapter", param=WEIGHTS_NAME)
        return BASE_LAYER if param == "base_layer.weight" else COPY
    embedding = param.startswith("lora_embedding_")
    if embedding != (name == EMBED) or embedding == param.endswith(".weight"):
        want = "lora_embedding_A/B" if name == EMBED else "lora_A.weight/lora_B.weight"
        raise InvalidAdapter(f"tensor {key!r}: PEFT names the LoRA weights of {name} {want}",
                             param=WEIGHTS_NAME)
    return param[len("lora_embedding_") if embedding else len("lora_")]
