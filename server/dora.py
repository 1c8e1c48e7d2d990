"""DoRA against the frozen base weights: the per-output scale ``g``, computed once per adapter load.

PEFT's DoRA module (peft/tuners/lora/dora.py, ``DoraLinearLayer``) computes, for base weight
``W0 [out, in]`` and LoRA factors ``A [r, in]``, ``B [out, r]``, scale ``s`` and the trained magnitude
``m [out]``::

    y = m / ||W0 + s B A||_row  *  (W0 x + s B A x)        (+ bias, which Llama layers lack)

where ``||.||_row`` is the L2 norm of each output row, taken detached (a constant at inference).
For embed_tokens PEFT uses the same formula on the transposed embedding (``W0 = E.T [hidden,
vocab]``, ``A = lora_embedding_A [r, vocab]``, ``B = lora_embedding_B [hidden, r]``): one scale per
hidden column. So every site's DoRA is ``y = g * (base output + LoRA term)`` with
``g = m / ||W0 + s B A||_row``, which the backends apply in their expand epilogue.

Computing the norm needs ``W0``, but on CPU the base Linear layers keep only oneDNN-prepacked
weights. Instead of a second copy of the model, ``BaseWeights`` keeps each module's row norms
``||w_i||^2`` (taken at load, before prepacking; ~0.6 MB for SmolLM2) and expands
``||w_i + s b_i A||^2 = ||w_i||^2 + 2 s b_i (A w_i) + s^2 b_i (A A^T) b_i^T``, where ``A w_i`` are
the columns of ``A @ W0.T``: the base layer applied to ``A``'s rows (a rank-row forward). The
sum is taken in float64 (the base's norms in float32, like PEFT's own fp32 computation); ``g`` is
stored as float32 in an fp32 pool, rounded to the pool's dtype otherwise (PEFT's bf16 forward
rounds it too). It runs where adapters are parsed (the loader thread, or the upload's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from server.errors import InvalidAdapter
from server.model_config import EMBED, LM_HEAD, LORA_MODULES, MODEL_LAYER, ModelConfig

BaseProduct = Callable[[int, str, torch.Tensor], torch.Tensor]  # (layer, module, a [r, in]) -> a @ W0.T
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def weight_name(layer: int, module: str) -> str:
    """The base model's weight name of a LoRA site (Hugging Face Llama names)."""
    if layer == MODEL_LAYER and module == EMBED:
        return "model.embed_tokens.weight"
    if layer == MODEL_LAYER and module == LM_HEAD:
        return "lm_head.weight"
    return f"model.layers.{layer}.{'self_attn' if module in _ATTN else 'mlp'}.{module}.weight"


def _row_norms_sq(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Squared L2 norms along ``dim`` of ``w``, as float64 (the norms are taken in float32, whose
    rounding, ~1e-7 relative, is the same as PEFT's own fp32 computation; no fp64 copy of ``w``)."""
    return torch.linalg.vector_norm(w.float(), dim=dim).double().pow(2).cpu()


class BaseWeights:
    """What adapters need to know of the frozen base weights once the model has prepacked them.

    ``weights``: the base model's weights (Hugging Face names) as loaded, before prepacking;
    ``product(layer, module, a)``: ``a @ W0.T`` through the model's own layers; ``head_kept``:
    whether the model keeps the lm_head weight unpacked (tied to the embedding it always does).
    The norms of the layers' weights are taken now (~20 ms for SmolLM2); those of embed_tokens and
    lm_head, vocab-sized, only when an adapter first needs them if the model keeps the weight.
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], product: BaseProduct,
                 head_kept: bool) -> None:
        self.config = config
        self._product = product
        self._sq = {(layer, m): _row_norms_sq(weights[weight_name(layer, m)], 1)
                    for layer in range(config.num_layers) for m in LORA_MODULES}
        embed = weights["model.embed_tokens.weight"]
        head = weights.get("lm_head.weight", embed)
        self._lazy: dict[str, torch.Tensor] = {EMBED: embed}
        self._digests: dict[str, str] = {}
        if head_kept or head is embed:
            self._lazy[LM_HEAD] = head
        else:  # the prepacked head drops its weight: what we need of it, now
            self._sq[(MODEL_LAYER, LM_HEAD)] = _row_norms_sq(head, 1)
            self._digests[LM_HEAD] = _digest(head)

    def row_norms_sq(self, layer: int, module: str) -> torch.Tensor:
        """``||w_i||^2`` per output row of ``W0`` (float64, host)."""
        key = (layer, module)
        if key not in self._sq:  # embed_tokens' W0 is E.T: one norm per hidden column
            self._sq[key] = _row_norms_sq(self._lazy[module], 0 if module == EMBED else 1)
        return self._sq[key]

    def product(self, layer: int, module: str, a: torch.Tensor) -> torch.Tensor:
        """``a @ W0.T`` for ``a [r, in]``: float64 on the host."""
        return self._product(layer, module, a).double().cpu()

    def same_as_base(self, module: str, weight: torch.Tensor) -> bool:
        """Whether ``weight`` (in the serving dtype) is bit for bit the base model's embed_tokens or
        lm_head weight."""
        if module not in self._digests:
            self._digests[module] = _digest(self._lazy[module])
        return _digest(weight) == self._digests[module]


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    return f"{data.dtype}{tuple(data.shape)}" + hashlib.sha256(data.view(torch.uint8).numpy()).hexdigest()


def dora_scale(base: BaseWeights, layer: int, module: str, a: torch.Tensor, b: torch.Tensor, scale: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """``g = magnitude / ||W0 + scale * b @ a||_row`` (float32 ``[out]``); see the module docstring."""
    a64, b64 = a.double(), b.double()
    cross = (b64 * base.product(layer, module, a).T).sum(1)
    quad = ((b64 @ (a64 @ a64.T)) * b64).sum(1)
    norm_sq = base.row_norms_sq(layer, module) + 2 * scale * cross + scale * scale * quad
    norm = norm_sq.clamp_min(0).sqrt()
    g = (magnitude.double() / norm).float()
    if not bool(torch.isfinite(g).all()):
        raise InvalidAdapter(f"DoRA: {module} of layer {layer} has an output row whose weight norm "
                             "||W0 + s B A|| is 0, so its magnitude cannot be applied", param="use_dora")
    return g
