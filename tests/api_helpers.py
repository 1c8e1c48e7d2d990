"""Helpers for the HTTP tests: random PEFT adapters for SmolLM2 written directly as files, uploads,
/metrics samples, and a server process's open files, threads and memory (from /proc)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

BASE = "SmolLM2-135M-Instruct"
FILES = ("adapter_config.json", "adapter_model.safetensors")
# SmolLM2-135M: hidden 576, 9 heads and 3 KV heads of 64, MLP 1536, 30 layers.
SMOLLM2_SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
                  "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(out: Path, rank: int, modules: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 0,
                  std: float = 0.2, layers: int = 30, alpha: float | None = None) -> Path:
    """A random PEFT LoRA adapter for SmolLM2 as PEFT saves it. ``lora_B`` ~ N(0, std): 0.2 changes
    greedy text while keeping it fluent (tests/test_api_adapters.py)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for m in modules:
            in_f, out_f = SMOLLM2_SHAPES[m]
            prefix = f"base_model.model.model.layers.{layer}.{PARENTS[m]}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * std
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / FILES[1])
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank,
              "target_modules": list(modules), "base_model_name_or_path": BASE, "task_type": "CAUSAL_LM"}
    (out / FILES[0]).write_text(json.dumps(config))
    return out


def upload(url: str, adapter_id: str, directory: Path, replace: bool = False,
           headers: dict[str, str] | None = None) -> httpx.Response:
    files = {name: (name, (directory / name).read_bytes(), "application/octet-stream") for name in FILES}
    data = {"adapter_id": adapter_id, **({"replace": "true"} if replace else {})}
    return httpx.post(f"{url}/v1/adapters", files=files, data=data, headers=headers, timeout=120)


def metrics(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics: ``{(name, frozenset(labels.items())): value}``."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(url: str, name: str, default: float | None = None, **labels: str) -> float:
    """One sample, e.g. ``metric(url, "lora_server_pool_pages", kind="kv")``."""
    for (n, labelset), value in metrics(url).items():
        if n == name and all(dict(labelset).get(k) == v for k, v in labels.items()):
            return value
    if default is not None:
        return default
    raise AssertionError(f"{name} {labels} not in /metrics")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def threads(pid: int) -> int:
    return _status(pid, "Threads")


def rss_bytes(pid: int) -> int:
    return _status(pid, "VmRSS") * 1024


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until true; False after ``timeout`` (a bound on a hang, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
