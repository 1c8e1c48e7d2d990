"""Real PEFT adapters on copies of one base model, saved as PEFT dirs: the oracle for adapter tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from server.dora import BaseWeights, weight_name
from server.model_config import EMBED, ModelConfig
from tests.engine_helpers import hf_greedy


def build_adapters(base: torch.nn.Module, configs: dict[str, LoraConfig], out_dir: Path,
                   std: float, seed: int = 0) -> tuple[dict[str, PeftModel], dict[str, Path]]:
    """One PEFT model per config, each on its own copy of ``base`` (left untouched), with a random
    ``lora_B`` (PEFT initializes it to zero), random embedding factors (PEFT zeroes
    ``lora_embedding_A``) and DoRA magnitudes moved off their initial ``||W0 + s B A||`` by up to
    ~30% (so that DoRA's scale is not 1); each saved as a PEFT dir ``out_dir / name``."""
    torch.manual_seed(seed)
    models, paths = {}, {}
    for name, cfg in configs.items():
        model = get_peft_model(copy.deepcopy(base), cfg)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname or "lora_embedding_" in pname:
                    torch.nn.init.normal_(param, std=std)
                elif "lora_magnitude_vector" in pname:
                    param.mul_(1 + 0.3 * torch.rand_like(param) - 0.15)
        model.save_pretrained(out_dir / name)
        models[name] = model.eval()
        paths[name] = out_dir / name
    return models, paths


def peft_greedy(models: dict[str, PeftModel], base: torch.nn.Module, adapter: str | None,
                prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and last-prompt-position logits with one adapter (None: the base model)."""
    return hf_greedy(base if adapter is None else models[adapter], prompt, n)


def base_weights(model: torch.nn.Module, config: ModelConfig) -> BaseWeights:
    """Our BaseWeights over a Hugging Face model's weights (a PEFT model's frozen base), with plain
    matmuls for ``a @ W0.T``."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    state = base.state_dict()
    weights = {k.replace(".base_layer", ""): v.detach() for k, v in state.items() if "lora_" not in k}

    def product(layer: int, module: str, a: torch.Tensor) -> torch.Tensor:
        w = weights[weight_name(layer, module)]
        return a @ w if module == EMBED else a @ w.T

    return BaseWeights(config, weights, product, head_kept=True)
