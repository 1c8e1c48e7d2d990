"""Our Llama forward pass over the paged arena (not transformers' modeling code).

One call computes a whole engine step: prefill chunks and decode tokens of many requests, flattened
into ``T`` rows. The base model's matrix products are shared by all rows; the LoRA terms are added
per row by the step's ``LoraStep`` (kernels/lora_backend.py), one call per ``LoraGroup`` and layer.
q/k/v and gate/up weights are fused at load time so a layer makes four base GEMMs (and four LoRA
group calls); on CPU their weights are prepacked for oneDNN (``Linear``). The embedding and the
LM head are LoRA sites too (``ModelConfig.model_groups``): one call each per step, on the step's
token ids and on the sample rows' final hidden states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.dora import BaseWeights
from server.layers import Linear, RopeTables, RotaryCache
from server.model_config import EMBED, LM_HEAD, MODEL_LAYER, SAMPLES, LoraGroup, ModelConfig

if TYPE_CHECKING:
    from kernels.attention import AttnMeta
    from kernels.backend import KernelBackend
    from kernels.lora_backend import LoraStep


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [q_size + 2 * kv_size, hidden]
    o: Linear  # [hidden, q_size]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear  # [hidden, intermediate]


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], backend: KernelBackend,
                 max_positions: int, prepack: bool = True) -> None:
        self.config = config
        self.backend = backend
        self.embed = weights["model.embed_tokens.weight"]
        self.final_norm = weights["model.norm.weight"]
        self.lm_head = Linear(weights.get("lm_head.weight", self.embed), prepack)
        self.layers = [self._fuse(weights, i, prepack) for i in range(config.num_layers)]
        self.rotary = RotaryCache(config, max_positions, self.embed.device)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.qkv_lora, self.o_lora, self.gate_up_lora, self.down_lora = config.lora_groups()
        self.embed_lora, self.head_lora = config.model_groups()
        self._module_cols = {m: (g, c, c + w) for g in config.lora_groups()
                             for m, c, w in zip(g.modules, g.cols, g.widths, strict=True)}
        self.base = BaseWeights(config, weights, self.base_product, head_kept=self.lm_head.weight is not None)

    @staticmethod
    def _fuse(w: dict[str, torch.Tensor], i: int, prepack: bool) -> LayerWeights:
        p = f"model.layers.{i}."
        return LayerWeights(
            input_norm=w[p + "input_layernorm.weight"],
            qkv=Linear(torch.cat([w[p + f"self_attn.{m}_proj.weight"] for m in "qkv"]), prepack),
            o=Linear(w[p + "self_attn.o_proj.weight"], prepack),
            post_norm=w[p + "post_attention_layernorm.weight"],
            gate_up=Linear(torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]), prepack),
            down=Linear(w[p + "mlp.down_proj.weight"], prepack),
        )

    @torch.inference_mode()
    def base_product(self, layer: int, module: str, a: torch.Tensor) -> torch.Tensor:
        """``a @ W0.T`` for the base weight ``W0 [out, in]`` of a LoRA site and ``a [r, in]`` (DoRA's
        weight norms, server/dora.py): the model's own layers applied to ``a``'s rows."""
        a = a.to(self.embed.device, self.embed.dtype)
        if layer == MODEL_LAYER and module == EMBED:
            return a @ self.embed  # W0 = E.T
        if layer == MODEL_LAYER and module == LM_HEAD:
            return self.lm_head(a)
        group, c0, c1 = self._module_cols[module]
        lw = self.layers[layer]
        linear = {"qkv": lw.qkv, "o": lw.o, "gate_up": lw.gate_up, "down": lw.down}[group.name]
        return linear(a)[:, c0:c1]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttnMeta,
                kv_pages: torch.Tensor, lora: LoraStep | None, sample_rows: torch.Tensor,
                vocab: int = 0) -> torch.Tensor:
        """Logits ``[len(sample_rows), max(vocab, config.vocab_size)]`` (fp32) for the rows that sample.

        input_ids, positions: ``[T]``; kv_pages: ``[num_pages, 2, block_size, kv_heads, head_dim]``
        (a view of the arena); the step's K/V are written to the pages before attention reads them.
        ``vocab``: the widest vocabulary of the step's adapters (tokens added by an adapter with its
        own embedding and head): the base model's logits are -inf past its own vocabulary, and
        ids past it (only an adapter's requests have them) are that adapter's embedding's to fill.
        """
        eps, ops, cfg = self.config.rms_norm_eps, self.backend, self.config
        h = self.embed[input_ids.clamp(max=cfg.vocab_size - 1)]  # the residual stream, updated in place
        if lora is not None:
            lora.apply(MODEL_LAYER, self.embed_lora, input_ids, h)
        rope = self.rotary.for_step(positions, h.dtype)
        x = ops.rms_norm(h, self.layers[0].input_norm, eps)
        for i, lw in enumerate(self.layers):
            x = ops.add_rms_norm(h, self._attention(i, lw, x, rope, attn, kv_pages, lora), lw.post_norm, eps)
            out = self._mlp(i, lw, x, lora)
            if i + 1 < len(self.layers):  # the residual add fused with the next layer's input norm
                x = ops.add_rms_norm(h, out, self.layers[i + 1].input_norm, eps)
            else:
                h.add_(out)
        h = ops.rms_norm(h[sample_rows], self.final_norm, eps)
        logits = self.lm_head(h)
        if vocab > cfg.vocab_size:
            pad = logits.new_full((logits.shape[0], vocab - cfg.vocab_size), float("-inf"))
            logits = torch.cat([logits, pad], dim=1)
        if lora is not None:
            lora.apply(MODEL_LAYER, self._head_group(logits.shape[1]), h, logits)
        return logits.float()

    def _head_group(self, width: int) -> LoraGroup:
        """The lm_head group for logits of ``width`` columns (wider than the base's with added tokens)."""
        if width == self.head_lora.out_features:
            return self.head_lora
        return LoraGroup(LM_HEAD, (LM_HEAD,), self.head_lora.in_features, (width,), SAMPLES)

    def _attention(self, i: int, lw: LayerWeights, x: torch.Tensor, rope: RopeTables, attn: AttnMeta,
                   kv_pages: torch.Tensor, lora: LoraStep | None) -> torch.Tensor:
        cfg = self.config
        qkv = lw.qkv(x)
        if lora is not None:
            lora.apply(i, self.qkv_lora, x, qkv)
        q = self.backend.rope_store_kv(qkv, rope, kv_pages, attn.slot_mapping[i], cfg.num_heads,
                                       cfg.num_kv_heads)
        o = self.backend.paged_attention(q, kv_pages, attn, i, self.scale).reshape(x.shape[0], cfg.q_size)
        out = lw.o(o)
        if lora is not None:
            lora.apply(i, self.o_lora, o, out)
        return out

    def _mlp(self, i: int, lw: LayerWeights, x: torch.Tensor, lora: LoraStep | None) -> torch.Tensor:
        gate_up = lw.gate_up(x)
        if lora is not None:
            lora.apply(i, self.gate_up_lora, x, gate_up)
        a = self.backend.silu_mul(gate_up)
        out = lw.down(a)
        if lora is not None:
            lora.apply(i, self.down_lora, a, out)
        return out
