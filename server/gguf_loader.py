"""Read a llama.cpp GGUF file into Hugging Face-named tensors and a ``ModelConfig``.

Every tensor is dequantized to float32 with ``gguf.quants.dequantize`` and then cast to the serving
dtype: the model code sees plain dense weights whatever the file's quantization. llama.cpp's
converter permutes the rows of q and k so its rotary kernel can rotate adjacent pairs; we undo that
so the weights equal what transformers (our correctness oracle) and HF checkpoints hold.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from server.model_config import ModelConfig, UnsupportedModel

logger = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

# GGUF block tensor name (without "blk.N." and ".weight") -> HF module path inside layer N.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.weight``) to its HF Llama name."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise UnsupportedModel(f"unexpected GGUF tensor {gguf_name!r}: not a Llama weight this server knows")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (``convert_hf_to_gguf.LlamaModel.permute``).

    The converter maps HF rows ``[head, half, pair, :]`` to ``[head, pair, half, :]`` (rotate-half
    layout to interleaved pairs). This is the inverse, the same as transformers'
    ``LlamaTensorProcessor._reverse_permute_weights``. ``n_heads`` is the number of heads the
    rows belong to: attention heads for q, KV heads for k.
    """
    out_features = w.shape[0]
    half = out_features // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFFile:
    """An opened GGUF file: metadata lookups, the model config and dequantized HF-named weights."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reader = GGUFReader(path)
        self.architecture = str(self.field("general.architecture"))
        if self.architecture not in SUPPORTED_GGUF_ARCHITECTURES:
            raise UnsupportedModel(
                f"GGUF architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
            )
        self.tensor_names = [t.name for t in self.reader.tensors]
        if "rope_freqs.weight" in self.tensor_names:
            # llama3-style frequency scaling is stored as a per-dimension tensor in GGUF, which
            # ModelConfig cannot express; serving without it would silently change the outputs.
            raise UnsupportedModel(
                "GGUF file carries rope_freqs (llama3 rope scaling); load the Hugging Face "
                "directory of this model instead"
            )

    def field(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key`` (scalar, string or list), or ``default`` if absent."""
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def array_len(self, key: str) -> int | None:
        """Length of array field ``key`` without decoding its items (the token list has ~50k)."""
        f = self.reader.fields.get(key)
        if f is None or not f.types or f.types[0] != GGUFValueType.ARRAY:
            return None
        return len(f.data)

    def arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.architecture}.{key}", default)

    def hf_config_dict(self) -> dict[str, Any]:
        """The GGUF metadata as a Hugging Face ``config.json``-style dict."""
        hidden = int(self.arch_field("embedding_length"))
        heads = int(self.arch_field("attention.head_count"))
        vocab = self.array_len("tokenizer.ggml.tokens") or self.arch_field("vocab_size")
        if vocab is None:
            raise UnsupportedModel("GGUF file has neither a token list nor a vocab_size")
        eos = [self.field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self.arch_field("feed_forward_length")),
            "num_hidden_layers": int(self.arch_field("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.arch_field("attention.head_count_kv", heads)),
            "head_dim": int(self.arch_field("attention.key_length", hidden // heads)),
            "rms_norm_eps": float(self.arch_field("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self.arch_field("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.arch_field("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in self.tensor_names,
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": list(dict.fromkeys(int(e) for e in eos if e is not None)),
        }
        scaling = self.arch_field("rope.scaling.type")
        if scaling not in (None, "none"):
            raise UnsupportedModel(f"GGUF rope scaling {scaling!r} is not supported")
        return d

    def config(self) -> ModelConfig:
        return ModelConfig.from_hf_dict(self.hf_config_dict())

    def weights(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> Weights:
        """Every tensor dequantized, un-permuted, cast to ``dtype`` on ``device``, under HF names."""
        out: Weights = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            a = dequantize(t.data, t.tensor_type)
            if np.may_share_memory(a, t.data):
                # F32 tensors come back as views of the read-only memory map: copy so the
                # tensor owns its memory and the file can be closed.
                a = a.copy()
            w = torch.from_numpy(a)
            if name.endswith("q_proj.weight"):
                w = unpermute_rotary(w, config.num_heads)
            elif name.endswith("k_proj.weight"):
                w = unpermute_rotary(w, config.num_kv_heads)
            out[name] = w.to(dtype=dtype, device=device)
        return out


def load_gguf(path: str, dtype: torch.dtype, device: torch.device) -> tuple[ModelConfig, Weights]:
    """Config and weights of the GGUF file at ``path`` (tokenizer is loaded separately)."""
    f = GGUFFile(path)
    config = f.config()
    weights = f.weights(config, dtype, device)
    qtypes = sorted({t.tensor_type.name for t in f.reader.tensors})
    logger.info("dequantized GGUF tensors", extra={"path": path, "quant_types": qtypes})
    return config, weights
