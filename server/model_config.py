"""Llama-family model configuration, parsed from a Hugging Face ``config.json`` dict.

Pure data: no tensors, no I/O. The loaders (``server/loader.py``) read files and call
``ModelConfig.from_hf_dict``; everything else takes a ``ModelConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# The LoRA-targetable linear modules of a layer, in a fixed order.
LORA_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The model-wide LoRA sites (one per model, not per layer). Adapter weights key them as layer
# ``MODEL_LAYER``, so every table indexed by (layer, module) holds them in one slot each.
EMBED, LM_HEAD = "embed_tokens", "lm_head"
MODEL_MODULES: tuple[str, ...] = (EMBED, LM_HEAD)
MODEL_LAYER = 0
# The module axis of every LoRA backend's descriptor tables: kernels index per-module descriptors by
# position in this tuple, and each ``LoraGroup`` is a consecutive run of it.
KERNEL_MODULES: tuple[str, ...] = LORA_MODULES + MODEL_MODULES


# What a group's ``x`` and rows are (see ``LoraGroup.kind``).
LINEAR, GATHER, SAMPLES = "linear", "gather", "samples"


@dataclass(frozen=True)
class LoraGroup:
    """Modules of one layer that read the same input and write consecutive column blocks of one
    fused output: our forward computes q/k/v as one GEMM and gate/up as one, so their LoRA terms are
    computed together too (one kernel launch per group and layer, not per module).

    ``first`` is the index of ``modules[0]`` in ``KERNEL_MODULES``; module ``i`` of the group writes
    columns ``cols[i] : cols[i] + widths[i]`` of the group's output.

    ``kind`` says what the group's call reads: ``LINEAR``: ``x`` holds one activation row per token
    of the step; ``GATHER`` (embed_tokens): ``x`` holds the step's token ids and the shrink is a
    lookup of row ``x[t]`` of ``A.T`` (``in_features`` is the vocabulary); ``SAMPLES`` (lm_head):
    ``x`` and ``y`` hold only the step's sample rows, whose adapters are the step's sample segments.
    """

    name: str
    modules: tuple[str, ...]
    in_features: int
    widths: tuple[int, ...]
    kind: str = LINEAR

    def __post_init__(self) -> None:
        start = KERNEL_MODULES.index(self.modules[0])
        if KERNEL_MODULES[start : start + len(self.modules)] != self.modules:
            raise ValueError(f"group {self.name}: {self.modules} is not a run of {KERNEL_MODULES}")
        if len(self.widths) != len(self.modules):
            raise ValueError(f"group {self.name}: one width per module")
        if self.kind not in (LINEAR, GATHER, SAMPLES):
            raise ValueError(f"group {self.name}: unknown kind {self.kind!r}")

    @property
    def first(self) -> int:
        return KERNEL_MODULES.index(self.modules[0])

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

    def model_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the model-wide LoRA sites, as PEFT sees them: embed_tokens
        maps a one-hot token (the vocabulary) to hidden; lm_head maps hidden to the vocabulary."""
        return {EMBED: (self.vocab_size, self.hidden_size), LM_HEAD: (self.hidden_size, self.vocab_size)}

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """``linear_shapes`` and ``model_shapes`` together, keyed by module name."""
        return {**self.linear_shapes(), **self.model_shapes()}

    def model_groups(self) -> tuple[LoraGroup, LoraGroup]:
        """The embed_tokens group (applied to the step's token ids) and the lm_head group (applied
        to the sample rows' final hidden states)."""
        shapes = self.model_shapes()
        return (LoraGroup(EMBED, (EMBED,), shapes[EMBED][0], (shapes[EMBED][1],), GATHER),
                LoraGroup(LM_HEAD, (LM_HEAD,), shapes[LM_HEAD][0], (shapes[LM_HEAD][1],), SAMPLES))

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
