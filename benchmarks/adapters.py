"""Synthetic PEFT adapters on disk, fast: safetensors written directly, not through peft.

Generating 2,000 adapters by building a PeftModel each time would take many minutes; instead each
adapter's tensors are slices (at a per-adapter offset) of one random pool, saved with PEFT's key
names and shapes and a PEFT ``adapter_config.json``. ``validate_with_peft`` loads a few with peft
itself to show the files are real PEFT adapters.

Each family is kept twice: ``<root>/peft/<id>/`` are plain PEFT dirs (what vLLM and PEFT load) and
``<root>/store`` is our adapter store holding the same files (``adapter_store/store.py``), so our
engine and server register them at start-up without reading the weights: every adapter starts
cold, on disk only.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapter_store.peft_config import MODULE_PARENTS
from adapter_store.peft_format import CONFIG_NAME, WEIGHTS_NAME
from adapter_store.store import AdapterStore
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
             dtype: torch.dtype, b_std: float = B_STD) -> dict[str, torch.Tensor]:
    shapes = cfg.linear_shapes()
    out = {}
    for layer in range(cfg.num_layers):
        for mod in spec.targets:
            k, n = shapes[mod]
            prefix = f"base_model.model.model.layers.{layer}.{MODULE_PARENTS[mod]}.{mod}"
            parts = (("lora_A", (spec.rank, k), k**-0.5), ("lora_B", (n, spec.rank), b_std))
            for name, shape, std in parts:
                numel = shape[0] * shape[1]
                start = (offset * 7919) % (pool.numel() - numel)
                offset += numel
                out[f"{prefix}.{name}.weight"] = (pool[start : start + numel] * std).view(shape).to(dtype)
    return out


def write_adapter(root: Path, spec: AdapterSpec, cfg: ModelConfig, pool: torch.Tensor, seed: int,
                  dtype: torch.dtype, b_std: float = B_STD) -> Path:
    """One PEFT dir ``root/<id>``; ``b_std`` scales lora_B (larger: a bigger change of the outputs)."""
    d = root / spec.adapter_id
    tmp = root / f".{spec.adapter_id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_NAME).write_text(json.dumps(peft_config(spec), indent=2))
    save_file(_tensors(spec, cfg, pool, seed * 104_729, dtype, b_std), str(tmp / WEIGHTS_NAME))
    tmp.rename(d)  # whole or absent: an interrupted run rewrites it
    return d


def random_pool(seed: int = 1234) -> torch.Tensor:
    """The random numbers every synthetic adapter's tensors are sliced from."""
    return torch.randn(_POOL_ELEMS, generator=torch.Generator().manual_seed(seed))


def store_dir(peft_root: Path) -> Path:
    """Our adapter store next to the PEFT dirs that ``ensure_adapters`` returned."""
    return peft_root.parent / "store"


def ensure_adapters(root: Path, specs: list[AdapterSpec], cfg: ModelConfig,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write the adapters of ``specs`` missing under ``root`` (a cache: existing ones are kept);
    returns the directory of PEFT dirs, ``root/peft`` (the store is ``store_dir`` of it)."""
    peft_root = root / "peft"
    peft_root.mkdir(parents=True, exist_ok=True)
    store = AdapterStore(store_dir(peft_root))
    pool = random_pool()
    start = time.perf_counter()
    made = 0
    for i, spec in enumerate(specs):
        d = peft_root / spec.adapter_id
        if not d.is_dir():
            write_adapter(peft_root, spec, cfg, pool, i, dtype)
            made += 1
        if not store.exists(spec.adapter_id):
            store.put(spec.adapter_id, d)
    if made:
        log.info("wrote %d adapters under %s in %.1f s", made, root, time.perf_counter() - start)
    return peft_root


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
