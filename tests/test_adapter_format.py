"""PEFT adapter parsing against real PEFT adapters of a tiny Llama: accepted shapes and refusals."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_store.peft_format import WEIGHTS_NAME, load_peft_adapter, parse_adapter_config
from server.errors import AdapterIncompatible, InvalidAdapter

REGEX = r".*\.layers\.[12]\.(self_attn\.k_proj|mlp\.up_proj)"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARENT = {n: "self_attn" if n in ALL[:4] else "mlp" for n in ALL}
Q_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def peft_module(peft_model, layer: int, name: str):
    return getattr(getattr(peft_model.base_model.model.model.layers[layer], PARENT[name]), name)


def assert_matches_peft(parsed, peft_model) -> None:
    """Every LoRA layer PEFT created is parsed with the same A, B, rank, scale and delta weight."""
    expected = {
        (int(m.group(1)), m.group(3))
        for name, _ in peft_model.named_modules()
        if (m := re.fullmatch(r".*layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)", name))
        and hasattr(_get(peft_model, name), "lora_A")
    }
    assert expected and set(parsed.weights) == expected
    for (layer, name), w in parsed.weights.items():
        mod = peft_module(peft_model, layer, name)
        a, b = mod.lora_A["default"].weight.float(), mod.lora_B["default"].weight.float()
        assert w.a.dtype == torch.float32 and w.b.dtype == torch.float32
        torch.testing.assert_close(w.a, a, rtol=0, atol=0)
        torch.testing.assert_close(w.b, b, rtol=0, atol=0)
        assert w.rank == mod.r["default"]
        assert w.scale == pytest.approx(mod.scaling["default"], rel=1e-12)
        with torch.no_grad():
            delta = mod.get_delta_weight("default").float()
        torch.testing.assert_close(w.scale * w.b @ w.a, delta, rtol=1e-2, atol=1e-3)


def _get(model, dotted: str):
    return model.get_submodule(dotted)


@pytest.mark.parametrize(
    ("kwargs", "modules", "rank"),
    [
        ({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}, ["q_proj", "v_proj"], 8),
        ({"r": 16, "lora_alpha": 32, "target_modules": ALL}, ALL, 16),
        ({"r": 1, "lora_alpha": 4, "target_modules": ["o_proj"]}, ["o_proj"], 1),
        ({"r": 4, "target_modules": "all-linear"}, ALL, 4),
        ({"r": 4, "target_modules": REGEX}, ["k_proj", "up_proj"], 4),
        ({"r": 9, "lora_alpha": 7, "use_rslora": True, "target_modules": ["q_proj", "down_proj"]},
         ["q_proj", "down_proj"], 9),
        ({"r": 4, "target_modules": ALL, "exclude_modules": r".*layers\.[03]\..*"}, ALL, 4),
        ({"r": 4, "target_modules": ["up_proj"], "exclude_modules": ["model.layers.2.mlp.up_proj"]},
         ["up_proj"], 4),
        ({"r": 2, "target_modules": ["v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
         ["v_proj"], 2),
    ],
    ids=["qv-r8", "all7-r16", "r1", "all-linear", "regex", "rslora", "exclude-regex", "exclude-list",
         "layers-pattern"],
)
def test_parses_like_peft(make_peft_adapter, tiny_model_config, kwargs, modules, rank):
    path, peft_model = make_peft_adapter(**kwargs)
    parsed = load_peft_adapter(path, tiny_model_config)
    assert_matches_peft(parsed, peft_model)
    assert parsed.config.target_modules == tuple(n for n in ALL if n in modules)
    assert parsed.ranks == (rank,)
    assert parsed.checksum == hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert parsed.nbytes == sum(w.a.nbytes + w.b.nbytes for w in parsed.weights.values())


def test_regex_targets_only_matching_layers(make_peft_adapter, tiny_model_config):
    path, _ = make_peft_adapter(r=4, target_modules=REGEX)
    parsed = load_peft_adapter(path, tiny_model_config)
    assert sorted(parsed.weights) == [(1, "k_proj"), (1, "up_proj"), (2, "k_proj"), (2, "up_proj")]


def test_rslora_scale(make_peft_adapter, tiny_model_config):
    path, _ = make_peft_adapter(r=9, lora_alpha=7, use_rslora=True, target_modules=["q_proj"])
    parsed = load_peft_adapter(path, tiny_model_config)
    assert {w.scale for w in parsed.weights.values()} == {7 / math.sqrt(9)}


def test_rank_and_alpha_patterns(make_peft_adapter, tiny_model_config):
    path, peft_model = make_peft_adapter(
        r=8,
        lora_alpha=16,
        target_modules=ALL,
        rank_pattern={"q_proj": 4, "model.layers.1.self_attn.v_proj": 2, r"layers\.3\.mlp\.\w+_proj": 12},
        alpha_pattern={"v_proj": 3, "down_proj": 40},
    )
    parsed = load_peft_adapter(path, tiny_model_config)
    assert_matches_peft(parsed, peft_model)
    w = parsed.weights
    assert (w[(0, "q_proj")].rank, w[(0, "q_proj")].scale) == (4, 16 / 4)
    assert (w[(1, "v_proj")].rank, w[(1, "v_proj")].scale) == (2, 3 / 2)
    assert (w[(0, "v_proj")].rank, w[(0, "v_proj")].scale) == (8, 3 / 8)
    assert (w[(3, "down_proj")].rank, w[(3, "down_proj")].scale) == (12, 40 / 12)
    assert (w[(2, "k_proj")].rank, w[(2, "k_proj")].scale) == (8, 2.0)
    assert parsed.ranks == (2, 4, 8, 12)


def test_layers_to_transform(make_peft_adapter, tiny_model_config):
    path, peft_model = make_peft_adapter(r=8, target_modules=["q_proj", "o_proj"], layers_to_transform=[0, 2])
    parsed = load_peft_adapter(path, tiny_model_config)
    assert_matches_peft(parsed, peft_model)
    assert sorted(parsed.weights) == [(0, "o_proj"), (0, "q_proj"), (2, "o_proj"), (2, "q_proj")]
    assert parsed.config.layers_to_transform == (0, 2)


def test_layers_to_transform_int(make_peft_adapter, tiny_model_config):
    path, peft_model = make_peft_adapter(r=8, target_modules=["k_proj"], layers_to_transform=3)
    parsed = load_peft_adapter(path, tiny_model_config)
    assert_matches_peft(parsed, peft_model)
    assert list(parsed.weights) == [(3, "k_proj")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights_cast_to_float32(make_peft_adapter, tiny_model_config, dtype):
    path, peft_model = make_peft_adapter(r=8, target_modules=["q_proj", "v_proj"], dtype=dtype)
    assert load_file(path / WEIGHTS_NAME)[Q_KEY].dtype == dtype
    parsed = load_peft_adapter(path, tiny_model_config, dtype=torch.float32)
    assert_matches_peft(parsed, peft_model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_factors_are_read_in_one_pass(make_peft_adapter, tiny_model_config, dtype, monkeypatch):
    """A file whose factors share a dtype: one read and cast for all of them (no per-tensor read),
    the same values as the per-tensor path."""
    import adapter_store.peft_format as pf

    path, peft_model = make_peft_adapter(r=8, target_modules=["q_proj", "v_proj"], dtype=dtype)
    per_tensor = []
    real = pf._read_tensor
    monkeypatch.setattr(pf, "_read_tensor", lambda *a: per_tensor.append(a[1].name) or real(*a))
    parsed = load_peft_adapter(path, tiny_model_config, dtype=torch.float32)
    assert per_tensor == []
    assert_matches_peft(parsed, peft_model)


def test_tolerates_default_adapter_name_in_keys(make_peft_adapter, tiny_model_config):
    path, peft_model = make_peft_adapter(r=8, target_modules=["q_proj"])
    tensors = load_file(path / WEIGHTS_NAME)
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, path / WEIGHTS_NAME)
    assert_matches_peft(load_peft_adapter(path, tiny_model_config), peft_model)


def test_parse_adapter_config_resolves_names():
    info = parse_adapter_config({"peft_type": "LORA", "r": 4, "target_modules": "all-linear"})
    assert info.target_modules == tuple(ALL)
    info = parse_adapter_config({"peft_type": "LORA", "target_modules": ["self_attn.v_proj", "q_proj"]})
    assert (info.r, info.lora_alpha, info.target_modules) == (8, 8.0, ("q_proj", "v_proj"))


# ---- refusals ------------------------------------------------------------------------------------


@pytest.fixture
def qv_adapter(make_peft_adapter) -> Path:
    path, _ = make_peft_adapter(r=8, target_modules=["q_proj", "v_proj"])
    return path


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(path: Path, fn) -> None:
    tensors = load_file(path / WEIGHTS_NAME)
    fn(tensors)
    save_file(tensors, path / WEIGHTS_NAME)


def refused(path: Path, model, error: type[Exception], *words: str, **kwargs) -> None:
    with pytest.raises(error) as info:
        load_peft_adapter(path, model, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_refuses_pickle_bin(qv_adapter, tiny_model_config):
    (qv_adapter / WEIGHTS_NAME).rename(qv_adapter / "adapter_model.bin")
    refused(qv_adapter, tiny_model_config, InvalidAdapter, "adapter_model.bin", "safetensors")


def test_refuses_missing_config(qv_adapter, tiny_model_config):
    (qv_adapter / "adapter_config.json").unlink()
    refused(qv_adapter, tiny_model_config, InvalidAdapter, "adapter_config.json", "missing")


def test_refuses_missing_weights(qv_adapter, tiny_model_config):
    (qv_adapter / WEIGHTS_NAME).unlink()
    refused(qv_adapter, tiny_model_config, InvalidAdapter, WEIGHTS_NAME, "missing")


def test_refuses_malformed_json(qv_adapter, tiny_model_config):
    (qv_adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    refused(qv_adapter, tiny_model_config, InvalidAdapter, "adapter_config.json", "not valid JSON")


def test_refuses_other_peft_type(qv_adapter, tiny_model_config):
    edit_config(qv_adapter, peft_type="IA3")
    refused(qv_adapter, tiny_model_config, InvalidAdapter, "peft_type", "IA3")


def test_refuses_rank_above_max(make_peft_adapter, tiny_model_config):
    path, _ = make_peft_adapter(r=16, target_modules=["q_proj"])
    refused(path, tiny_model_config, AdapterIncompatible, "r=16", "max_rank=8", "q_proj", max_rank=8)


def test_refuses_rank_pattern_above_max(make_peft_adapter, tiny_model_config):
    path, _ = make_peft_adapter(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 32})
    refused(path, tiny_model_config, AdapterIncompatible, "v_proj", "r=32", "max_rank=16", max_rank=16)


def test_refuses_shape_mismatch(make_peft_adapter, tiny_model_config):
    bigger = type(tiny_model_config)(**{**tiny_model_config.__dict__, "hidden_size": 96})
    path, _ = make_peft_adapter(r=8, target_modules=["q_proj"])
    refused(path, bigger, AdapterIncompatible, "q_proj", "layer 0", "[r, 96]", "[8, 64]")


def test_refuses_wrong_shape_tensor(qv_adapter, tiny_model_config):
    key = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"
    edit_tensors(qv_adapter, lambda t: t.__setitem__(key, torch.zeros(64, 8)))
    refused(qv_adapter, tiny_model_config, AdapterIncompatible, "v_proj", "layer 2", "[32, r]", "[64, 8]")


def test_refuses_unknown_module(qv_adapter, tiny_model_config):
    key = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"
    edit_tensors(qv_adapter, lambda t: t.__setitem__(key, torch.zeros(8, 64)))
    refused(qv_adapter, tiny_model_config, AdapterIncompatible, "qkv_proj")


def test_refuses_target_the_model_lacks(qv_adapter, tiny_model_config):
    edit_config(qv_adapter, target_modules=["c_attn"])
    refused(qv_adapter, tiny_model_config, AdapterIncompatible, "c_attn", "matches no module")


def test_refuses_layer_beyond_model(qv_adapter, tiny_model_config):
    key = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    edit_tensors(qv_adapter, lambda t: t.__setitem__(key, torch.zeros(8, 64)))
    refused(qv_adapter, tiny_model_config, AdapterIncompatible, "layer 7", "4 layers")


def test_refuses_layers_to_transform_beyond_model(qv_adapter, tiny_model_config):
    edit_config(qv_adapter, layers_to_transform=[1, 9])
    refused(qv_adapter, tiny_model_config, AdapterIncompatible, "layers_to_transform", "layer 9")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("modules_to_save", ["lm_head"], ["modules_to_save", "lm_head"]),
        ("lora_bias", True, ["lora_bias"]),
        ("fan_in_fan_out", True, ["fan_in_fan_out"]),
        ("use_dora", True, ["use_dora=true", "q_proj.lora_magnitude_vector is missing"]),
        ("target_modules", ["q_proj", "lm_head"], ["targets lm_head but", "no weights"]),
        ("target_modules", ["embed_tokens"], ["targets embed_tokens but", "no weights"]),
        ("bias", "all", ["bias"]),
        ("r", 0, ["r must be a positive integer", "0"]),
        ("init_lora_weights", "pissa", ["init_lora_weights", "pissa"]),
    ],
)
def test_refuses_unsupported_config(qv_adapter, tiny_model_config, field, value, words):
    edit_config(qv_adapter, **{field: value})
    refused(qv_adapter, tiny_model_config, InvalidAdapter, *words)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refuses_non_finite_weights(qv_adapter, tiny_model_config, bad):
    key = "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"

    def poison(t):
        t[key][5, 2] = bad

    edit_tensors(qv_adapter, poison)
    refused(qv_adapter, tiny_model_config, InvalidAdapter, key, "NaN or Inf")


def test_refuses_weights_that_overflow_the_serving_dtype(qv_adapter, tiny_model_config):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"

    def huge(t):
        t[key][0, 0] = 1e6  # finite in the file's fp32, beyond float16's 65504

    edit_tensors(qv_adapter, huge)
    refused(qv_adapter, tiny_model_config, InvalidAdapter, key, "overflows", dtype=torch.float16)
    assert load_peft_adapter(qv_adapter, tiny_model_config, dtype=torch.float32).ranks


def test_refuses_corrupt_safetensors(qv_adapter, tiny_model_config):
    data = (qv_adapter / WEIGHTS_NAME).read_bytes()
    (qv_adapter / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    refused(qv_adapter, tiny_model_config, InvalidAdapter, WEIGHTS_NAME, "corrupt or truncated")


def test_refuses_garbage_safetensors(qv_adapter, tiny_model_config):
    (qv_adapter / WEIGHTS_NAME).write_bytes(b"\xff" * 64)
    refused(qv_adapter, tiny_model_config, InvalidAdapter, "corrupt or truncated")


def test_refuses_missing_targeted_module(qv_adapter, tiny_model_config):
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    edit_tensors(qv_adapter, lambda t: [t.pop(f"{prefix}.lora_{s}.weight") for s in "AB"])
    refused(qv_adapter, tiny_model_config, InvalidAdapter, "q_proj of layer 1", "no weights")


def test_refuses_missing_b(qv_adapter, tiny_model_config):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    edit_tensors(qv_adapter, lambda t: t.pop(key))
    refused(qv_adapter, tiny_model_config, InvalidAdapter, "q_proj of layer 1", "lora_B")


def test_refuses_untargeted_weights(qv_adapter, tiny_model_config):
    edit_config(qv_adapter, target_modules=["q_proj"])
    refused(qv_adapter, tiny_model_config, InvalidAdapter, "v_proj", "does not target")


def test_refuses_stray_key(qv_adapter, tiny_model_config):
    edit_tensors(qv_adapter, lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(2, 2)))
    refused(qv_adapter, tiny_model_config, InvalidAdapter, "lm_head")


def test_refuses_config_rank_mismatch(qv_adapter, tiny_model_config):
    edit_config(qv_adapter, r=4)
    refused(qv_adapter, tiny_model_config, InvalidAdapter, "rank 4", "[8, 64]")
