"""Llama-family model configuration, parsed from a Hugging Face ``config.json`` dict.

Pure data: no tensors, no I/O. The loaders (``server/loader.py``) read files and call
``ModelConfig.from_hf_dict``; everything else takes a ``ModelConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# The LoRA-targetable linear modules of a layer, in a fixed order: kernels index per-module
# descriptors by position in this tuple, and each ``LoraGroup`` is a consecutive run of it.
LORA_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraGroup:
    """Modules of one layer that read the same input and write consecutive column blocks of one
    fused output: our forward computes q/k/v as one GEMM and gate/up as one, so their LoRA terms are
    computed together too (one kernel launch per group and layer, not per module).

    ``first`` is the index of ``modules[0]`` in ``LORA_MODULES``; module ``i`` of the group writes
    columns ``cols[i] : cols[i] + widths[i]`` of the group's output.
    """

    name: str
    modules: tuple[str, ...]
    in_features: int
    widths: tuple[int, ...]

    def __post_init__(self) -> None:
        start = LORA_MODULES.index(self.modules[0])
        if LORA_MODULES[start : start + len(self.modules)] != self.modules:
            raise ValueError(f"group {self.name}: {self.modules} is not a consecutive run of {LORA_MODULES}")
        if len(self.widths) != len(self.modules):
            raise ValueError(f"group {self.name}: one width per module")

    @property
    def first(self) -> int:
        return LORA_MODULES.index(self.modules[0])

    @property
    def cols(self) -> tuple[int, ...]:
        return tuple(sum(self.widths[:i]) for i in range(len(self.widths)))

    @property
    def out_features(self) -> int:
        return sum(self.widths)


class UnsupportedModel(ValueError):
    """The model config describes something this server cannot serve."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (``rope_type == "llama3"``); ``None`` means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope_scaling: RopeScaling | None = None
    architecture: str = "LlamaForCausalLM"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise UnsupportedModel(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of one token's K (or V) vector for one layer: smaller than hidden under GQA."""
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-targetable linear module of one layer, in
        ``LORA_MODULES`` order."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def lora_groups(self) -> tuple[LoraGroup, ...]:
        """The module groups the forward applies LoRA to, in forward order: q/k/v, o, gate/up, down."""
        shapes = self.linear_shapes()
        groups = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)),
                  ("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",)))
        return tuple(LoraGroup(name, mods, shapes[mods[0]][0], tuple(shapes[m][1] for m in mods))
                     for name, mods in groups)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        model_type = d.get("model_type", "llama")
        if arch not in SUPPORTED_ARCHITECTURES and model_type not in ("llama", "mistral"):
            raise UnsupportedModel(
                f"architecture {arch!r} (model_type {model_type!r}) is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise UnsupportedModel(f"{flag}=true is not supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModel(f"hidden_act={act!r} is not supported (only silu)")
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
        # transformers >= 5 nests rope settings in `rope_parameters`; older configs use
        # top-level `rope_theta` and `rope_scaling`.
        rope = dict(d.get("rope_parameters") or {})
        nested = rope if rope.get("rope_type", "default") != "default" else None
        scaling_src = d.get("rope_scaling") or nested
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            rope_scaling=_parse_rope_scaling(scaling_src),
            architecture=arch,
        )


def _parse_rope_scaling(s: dict[str, Any] | None) -> RopeScaling | None:
    if not s:
        return None
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedModel(f"rope_scaling type {kind!r} is not supported (only llama3)")
    return RopeScaling(
        factor=float(s["factor"]),
        low_freq_factor=float(s.get("low_freq_factor", 1.0)),
        high_freq_factor=float(s.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(s["original_max_position_embeddings"]),
    )
