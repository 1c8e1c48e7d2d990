"""The pool's default budget (server/memory.py): MemAvailable, capped by the cgroup's room."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import memory
from server.config import EngineConfig


def test_meminfo_and_cgroup_room(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   20000000 kB\n")
    assert memory._meminfo_available(info) == 20000000 * 1024
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    v1.mkdir()
    (v2 / "memory.max").write_text("max\n")  # no limit in v2 ...
    (v2 / "memory.current").write_text("100\n")
    assert memory.cgroup_room(v2, v1) is None
    (v1 / "memory.limit_in_bytes").write_text("8000\n")  # ... but one in v1
    (v1 / "memory.usage_in_bytes").write_text("3000\n")
    assert memory.cgroup_room(v2, v1) == 5000
    (v2 / "memory.max").write_text("4096\n")
    assert memory.cgroup_room(v2, v1) == 4096 - 100


def test_budget_is_a_fraction_of_what_is_available() -> None:
    assert memory.pool_budget(0.25, 8 * 2**30) == 2 * 2**30
    assert 0 < memory.pool_budget(0.01) < memory.available_bytes()
    with pytest.raises(ValueError, match="fraction"):
        memory.pool_budget(1.5, 100)


def test_config_defaults_to_the_fraction() -> None:
    cfg = EngineConfig()
    assert cfg.pool_bytes is None and cfg.pool_memory_fraction == memory.DEFAULT_FRACTION
    with pytest.raises(ValueError, match="pool_memory_fraction"):
        EngineConfig(pool_memory_fraction=0.99)
    with pytest.raises(ValueError, match="pool_bytes"):
        EngineConfig(pool_bytes=0)


def test_default_on_a_24_gib_machine_holds_64_adapters_and_64_requests() -> None:
    """~20 GiB are available once SmolLM2 and the server are loaded on a 24 GiB machine: the default
    pool holds 64 distinct rank-64 q,k,v,o adapters (fp32 rows, the largest case) beside 64 running
    requests of 1,024 tokens each (4.7 of 7.0 GiB)."""
    from server.adapter_residency import AdapterSpec, ModuleSpec
    from server.model_config import ModelConfig
    from server.page_layout import PageLayout

    cfg = ModelConfig.from_hf_dict(dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3))
    layout, shapes = PageLayout.for_model(cfg), cfg.linear_shapes()
    adapter = AdapterSpec(1, "r64", {(layer, m): ModuleSpec(64, 2.0, *shapes[m]) for layer in range(30)
                                     for m in ("q_proj", "k_proj", "v_proj", "o_proj")})
    need = 64 * adapter.pages_needed(layout) + 64 * layout.kv_blocks_for_tokens(1024) * layout.num_layers
    assert memory.pool_budget(memory.DEFAULT_FRACTION, 20 * 2**30) // layout.page_bytes >= need
