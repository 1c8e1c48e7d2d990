"""PEFT ``adapter_config.json``: validation and target resolution against a Llama-family model.

Pure Python (no torch). Target matching reproduces PEFT 0.21 exactly, so an adapter is applied to
the same (layer, module) pairs with the same rank and alpha that PEFT itself would use:

* ``target_modules`` as a string is a regex full-matched against module keys such as
  ``model.layers.3.self_attn.q_proj`` (``check_target_module_exists``); ``"all-linear"`` means every
  linear layer except the output embedding;
* as a list, an entry matches a key equal to it or ending in ``"." + entry``; only then do
  ``layers_to_transform`` / ``layers_pattern`` restrict the layer index;
* ``exclude_modules`` (regex string or list) wins over ``target_modules``;
* ``rank_pattern`` / ``alpha_pattern``: the first key (in file order) for which
  ``re.match(rf"(.*\\.)?({key})$", module_key)`` succeeds gives the value (``get_pattern_key``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from server.errors import AdapterIncompatible, InvalidAdapter
from server.model_config import EMBED, KERNEL_MODULES, LM_HEAD, LORA_MODULES, MODEL_LAYER, ModelConfig

# The submodule each LoRA-targetable linear module lives in (PEFT keys name it); the module names
# and their order belong to the model (server/model_config.py).
MODULE_PARENTS: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
assert tuple(MODULE_PARENTS) == LORA_MODULES, "MODULE_PARENTS must name every LoRA module, in order"
ALL_LINEAR = "all-linear"
# The model-wide LoRA sites by the module key PEFT matches (PEFT's lm_head of a tied model is the
# same module key: LoRA on it adds to the logits only, the input embedding stays the base's).
MODEL_KEYS: dict[str, str] = {EMBED: "model.embed_tokens", LM_HEAD: "lm_head"}
_GLOBAL_KEYS = ("model", "model.layers", "model.norm", "model.rotary_emb")
_LAYER_SUBKEYS = ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm")

# Config flags that change what the adapter computes (or what it expects of the base weights) in
# ways our shrink/expand kernels don't implement. Refusing beats silently serving wrong outputs.
_REFUSED: dict[str, str] = {
    "lora_bias": "lora_bias=true (a trained bias on lora_B) is not supported",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D-style transposed weights) is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported (it changes embeddings)",
    "target_parameters": "target_parameters={value!r} is not supported (only target_modules)",
    "layer_replication": "layer_replication is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "use_qalora": "QA-LoRA (use_qalora=true) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
}
# init_lora_weights values whose saved adapter only works on a base model modified at init time.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraConfigInfo:
    """The parts of a PEFT LoRA config that decide which weights exist and how they are scaled.

    ``target_modules`` are our module names (subset of ``KERNEL_MODULES``: the layer modules and
    the model-wide embed_tokens/lm_head) the config targets in at least one layer; ``target_spec``
    is the config's own value (tuple of names or a regex string). ``use_dora``: every targeted
    module is DoRA (its file holds a magnitude vector per module).
    """

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    target_spec: tuple[str, ...] | str
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    base_model_name_or_path: str | None = None
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()  # the config's entries (PEFT matches keys ending with one)

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """Rank and alpha PEFT gives the module with full key ``key`` (``get_pattern_key``)."""
        r_key = _pattern_key(self.rank_pattern, key)
        a_key = _pattern_key(self.alpha_pattern, key)
        return self.rank_pattern.get(r_key, self.r), self.alpha_pattern.get(a_key, self.lora_alpha)

    def scale_for(self, rank: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (as PEFT's ``update_layer``)."""
        return alpha / rank**0.5 if self.use_rslora else alpha / rank

    def resolve(self, model: ModelConfig) -> dict[tuple[int, str], tuple[int, float]]:
        """Every targeted (layer, module) of ``model`` mapped to (rank, alpha); embed_tokens and
        lm_head are keyed ``(MODEL_LAYER, name)``.

        Raises AdapterIncompatible if the config targets layers the model lacks, modules that are
        neither linear nor the embedding/head, or nothing at all.
        """
        for idx in self.layers_to_transform or ():
            if idx >= model.num_layers:
                raise AdapterIncompatible(
                    f"layers_to_transform includes layer {idx} but the base model has "
                    f"{model.num_layers} layers (0..{model.num_layers - 1})",
                    param="layers_to_transform",
                )
        for key in _other_module_keys(model.num_layers):
            if self.matches(key):
                raise AdapterIncompatible(f"target_modules matches {key!r}, which is not a linear layer")
        targets = {
            (layer, name): self.rank_and_alpha(module_key(layer, name))
            for layer in range(model.num_layers)
            for name in LORA_MODULES
            if self.matches(module_key(layer, name))
        }
        targets |= {(MODEL_LAYER, name): self.rank_and_alpha(key) for name, key in MODEL_KEYS.items()
                    if self.matches(key)}
        for name in self.copies(model):
            if (MODEL_LAYER, name) in targets:
                raise InvalidAdapter(f"{name} is both a LoRA target (target_modules) and in modules_to_save",
                                     param="modules_to_save")
        if not targets:
            raise AdapterIncompatible(
                f"target_modules={self.target_spec!r} matches no module of the base model "
                f"(modules: {', '.join(KERNEL_MODULES)})",
                param="target_modules",
            )
        return targets

    def copies(self, model: ModelConfig) -> tuple[str, ...]:
        """The model-wide modules (embed_tokens, lm_head) whose full copies ``modules_to_save`` asks
        for, matched as PEFT's ``_set_trainable`` does (a module key ending with an entry). Raises
        InvalidAdapter for an entry that matches any other module; entries matching nothing are
        ignored, as PEFT ignores them."""
        keys = [*MODEL_KEYS.values(), *_other_module_keys(model.num_layers),
                *(module_key(layer, n) for layer in range(model.num_layers) for n in LORA_MODULES)]
        out = []
        for entry in self.modules_to_save:
            for key in (k for k in keys if k.endswith(entry)):
                name = next((n for n, k in MODEL_KEYS.items() if k == key), None)
                if name is None:
                    raise InvalidAdapter(f"modules_to_save entry {entry!r} matches {key!r}: only full copies "
                                         "of embed_tokens and lm_head are supported", param="modules_to_save")
                if name not in out:
                    out.append(name)
        return tuple(n for n in MODEL_KEYS if n in out)

    def matches(self, key: str) -> bool:
        """PEFT's ``check_target_module_exists`` for our config subset."""
        if self._excluded(key):
            return False
        if isinstance(self.target_spec, str):
            return re.fullmatch(self.target_spec, key) is not None
        if key in self.target_spec:
            return True
        if not any(key.endswith(f".{t}") for t in self.target_spec):
            return False
        if not self.layers_to_transform:
            return True
        return _layer_index(key, self.layers_pattern) in self.layers_to_transform

    def _excluded(self, key: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, key) is not None
        return key in ex or any(key.endswith(f".{e}") for e in ex)


def module_key(layer: int, name: str) -> str:
    """Full module key PEFT matches against, e.g. ``model.layers.3.self_attn.q_proj``."""
    return f"model.layers.{layer}.{MODULE_PARENTS[name]}.{name}"


def _other_module_keys(num_layers: int) -> list[str]:
    """Keys of the modules of a Llama model that LoRA may not target."""
    per_layer = [f"model.layers.{i}{s}" for i in range(num_layers) for s in _LAYER_SUBKEYS]
    return [*_GLOBAL_KEYS, *per_layer]


def _pattern_key(patterns: dict[str, Any], key: str) -> str:
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _layer_index(key: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def parse_adapter_config(data: dict[str, Any]) -> LoraConfigInfo:
    """Validate a parsed ``adapter_config.json``; raise InvalidAdapter naming the bad field."""
    if not isinstance(data, dict):
        raise InvalidAdapter(f"adapter_config.json must be a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapter(f"peft_type={peft_type!r} is not supported (only 'LORA')", param="peft_type")
    _refuse_unsupported(data)
    spec = _target_spec(data.get("target_modules"))
    layers = _int_tuple(data.get("layers_to_transform"), "layers_to_transform")
    if isinstance(spec, str) and (layers is not None or data.get("layers_pattern")):
        raise InvalidAdapter(
            "layers_to_transform/layers_pattern cannot be used when target_modules is a string",
            param="layers_to_transform",
        )
    rank_pattern, alpha_pattern = _patterns(data)
    exclude = data.get("exclude_modules")
    if isinstance(exclude, str):
        _regex(exclude, "exclude_modules")
    elif exclude:
        exclude = _str_tuple(exclude, "exclude_modules")
    base = data.get("base_model_name_or_path")
    info = LoraConfigInfo(
        r=_positive_int(data.get("r", 8), "r"),
        lora_alpha=_number(data.get("lora_alpha", 8), "lora_alpha"),
        target_modules=(),
        target_spec=spec,
        use_rslora=bool(data.get("use_rslora", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers_to_transform=layers,
        layers_pattern=_str_tuple(data.get("layers_pattern"), "layers_pattern"),
        exclude_modules=exclude or None,
        base_model_name_or_path=str(base) if base is not None else None,
        use_dora=_flag(data, "use_dora"),
        modules_to_save=_str_tuple(data.get("modules_to_save"), "modules_to_save") or (),
    )
    # Model-independent guess (a list spec matches the same names in every layer unless
    # layers_to_transform or exclude_modules single layers out; otherwise 256 layers are probed);
    # load_peft_adapter replaces it with the exact set for the real model.
    probe = 256 if isinstance(spec, str) or layers or exclude else 1
    names = {n for layer in range(probe) for n in LORA_MODULES if info.matches(module_key(layer, n))}
    names |= {n for n, key in MODEL_KEYS.items() if info.matches(key)}
    return with_targets(info, names)


def with_targets(info: LoraConfigInfo, names: set[str]) -> LoraConfigInfo:
    """``info`` with ``target_modules`` set to ``names`` in canonical module order."""
    return replace(info, target_modules=tuple(n for n in KERNEL_MODULES if n in names))


def _flag(data: dict[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidAdapter(f"{name} must be true or false, got {value!r}", param=name)
    return value


def _patterns(data: dict[str, Any]) -> tuple[dict[str, int], dict[str, float]]:
    ranks = {str(k): _positive_int(v, f"rank_pattern[{k!r}]") for k, v in _dict(data, "rank_pattern").items()}
    alphas = {str(k): _number(v, f"alpha_pattern[{k!r}]") for k, v in _dict(data, "alpha_pattern").items()}
    for pattern in (*ranks, *alphas):
        _regex(pattern, "rank_pattern/alpha_pattern")
    return ranks, alphas


def _refuse_unsupported(data: dict[str, Any]) -> None:
    for name, message in _REFUSED.items():
        value = data.get(name)
        if value:
            raise InvalidAdapter(message.format(value=value), param=name)
    bias = data.get("bias", "none")
    if bias != "none":
        raise InvalidAdapter(f"bias={bias!r} (trained base-model biases) is not supported", param="bias")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise InvalidAdapter(
            f"init_lora_weights={init!r}: this adapter expects modified base weights; "
            "convert it to a plain LoRA adapter first",
            param="init_lora_weights",
        )


def _target_spec(value: Any) -> tuple[str, ...] | str:
    if value is None:
        raise InvalidAdapter("target_modules is missing", param="target_modules")
    if isinstance(value, str):
        return tuple(LORA_MODULES) if value.lower() == ALL_LINEAR else _regex(value, "target_modules")
    spec = _str_tuple(value, "target_modules")
    if not spec:
        raise InvalidAdapter("target_modules is empty", param="target_modules")
    return spec


def _regex(pattern: str, name: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidAdapter(f"{name} is not a valid regex ({pattern!r}): {exc}", param=name) from exc
    return pattern


def _dict(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise InvalidAdapter(f"{name} must be an object, got {value!r}", param=name)
    return value


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidAdapter(f"{name} must be a positive integer, got {value!r}", param=name.split("[")[0])
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidAdapter(f"{name} must be a number, got {value!r}", param=name.split("[")[0])
    return float(value)


def _int_tuple(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None or value == []:
        return None
    items = [value] if isinstance(value, int) else value
    valid = isinstance(items, list) and all(type(i) is int and i >= 0 for i in items)
    if not valid:
        raise InvalidAdapter(f"{name} must be a non-negative int or list of them, got {value!r}", param=name)
    return tuple(items)


def _str_tuple(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise InvalidAdapter(f"{name} must be a string or list of strings, got {value!r}", param=name)
    return tuple(items)
