"""Synthetic PEFT adapters on disk, fast: safetensors written directly, not through peft.

Generating 2,000 adapters by building a PeftModel each time would take many minutes; instead each
adapter's tensors are slices (at a per-adapter offset) of one random pool, saved with PEFT's key
names and shapes and a PEFT ``adapter_config.json``. ``validate_with_peft`` loads a few with peft
itself to show the files are real PEFT adapters.

The dirs double as an adapter store (``<root>/<id>/meta.json``, the format of
``adapter_store/store.py``), so our engine and server register them at start-up without reading
the weights: every adapter starts cold, on disk only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapter_store.peft_config import MODULE_PARENTS
from adapter_store.peft_format import CONFIG_NAME, WEIGHTS_NAME
from adapter_store.store import META_NAME, StoredAdapterMeta
from benchmarks.workload import AdapterSpec
from server.model_config import ModelConfig

log = logging.getLogger(__name__)

_POOL_ELEMS = 1 << 22
B_STD = 0.02  # lora_B scale: visibly changes outputs while keeping logits sane (alpha / r = 2)


def peft_config(spec: AdapterSpec) -> dict:
    """A PEFT 0.21 LoraConfig as saved by ``save_pretrained``."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": spec.rank, "lora_alpha": 2 * spec.rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(spec.targets), "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def _tensors(spec: AdapterSpec, cfg: ModelConfig, pool: torch.Tensor, offset: int,
             dtype: torch.dtype) -> dict[str, torch.Tensor]:
    shapes = cfg.linear_shapes()
    out = {}
    for layer in range(cfg.num_layers):
        for mod in spec.targets:
            k, n = shapes[mod]
            prefix = f"base_model.model.model.layers.{layer}.{MODULE_PARENTS[mod]}.{mod}"
            parts = (("lora_A", (spec.rank, k), k**-0.5), ("lora_B", (n, spec.rank), B_STD))
            for name, shape, std in parts:
                numel = shape[0] * shape[1]
                start = (offset * 7919) % (pool.numel() - numel)
                offset += numel
                out[f"{prefix}.{name}.weight"] = (pool[start : start + numel] * std).view(shape).to(dtype)
    return out


def write_adapter(root: Path, spec: AdapterSpec, cfg: ModelConfig, pool: torch.Tensor, seed: int,
                  dtype: torch.dtype) -> None:
    """One PEFT dir ``root/<id>`` with a store ``meta.json``."""
    d = root / spec.adapter_id
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_NAME).write_text(json.dumps(peft_config(spec), indent=2))
    save_file(_tensors(spec, cfg, pool, seed * 104_729, dtype), str(d / WEIGHTS_NAME))
    data = (d / WEIGHTS_NAME).read_bytes()
    size = len(data) + (d / CONFIG_NAME).stat().st_size
    meta = StoredAdapterMeta(spec.adapter_id, hashlib.sha256(data).hexdigest(), size, time.time())
    (d / META_NAME).write_text(json.dumps(asdict(meta)))


def ensure_adapters(root: Path, specs: list[AdapterSpec], cfg: ModelConfig,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write the adapters of ``specs`` missing under ``root`` (a cache: existing ones are kept)."""
    root.mkdir(parents=True, exist_ok=True)
    pool = torch.randn(_POOL_ELEMS, generator=torch.Generator().manual_seed(1234))
    start = time.perf_counter()
    made = 0
    for i, spec in enumerate(specs):
        if not (root / spec.adapter_id / META_NAME).is_file():
            write_adapter(root, spec, cfg, pool, i, dtype)
            made += 1
    if made:
        log.info("wrote %d adapters under %s in %.1f s", made, root, time.perf_counter() - start)
    return root


def validate_with_peft(base: torch.nn.Module, dirs: list[Path]) -> None:
    """Load each dir with peft and check every saved tensor landed in the model (raises if not)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    model = None
    for i, d in enumerate(dirs):
        name = f"v{i}"
        if model is None:
            model = PeftModel.from_pretrained(base, str(d), adapter_name=name)
        else:
            model.load_adapter(str(d), adapter_name=name)
        params = dict(model.named_parameters())
        for key, t in load_file(str(d / WEIGHTS_NAME)).items():
            mine = params[key.replace(".weight", f".{name}.weight")]
            if not torch.equal(mine.detach().to(t.dtype), t):
                raise AssertionError(f"{d}: {key} differs after peft loading")
    log.info("validated %d synthetic adapters with peft", len(dirs))
