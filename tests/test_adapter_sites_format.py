"""Parsing DoRA and embed_tokens / lm_head LoRA adapters made by PEFT, DoRA's scale against PEFT's own
weight norm, and the refusals that remain (each naming the field or tensor)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_store.peft_format import WEIGHTS_NAME, load_peft_adapter
from server.adapter_prep import prepare_for_base
from server.dora import weight_name
from server.errors import AdapterIncompatible, InvalidAdapter
from server.model_config import MODEL_LAYER
from tests.peft_helpers import base_weights

SITES = ["q_proj", "down_proj", "embed_tokens", "lm_head"]
EMB = "base_model.model.model.embed_tokens"


def edit_tensors(path, fn) -> None:
    tensors = load_file(path / WEIGHTS_NAME)
    fn(tensors)
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})


def peft_dora_scales(peft_model) -> dict[str, torch.Tensor]:
    """``m / ||W0 + s B A||`` as PEFT's own DoRA layers compute it, per module path."""
    out = {}
    for name, mod in peft_model.named_modules():
        if not hasattr(mod, "lora_magnitude_vector") or "default" not in mod.lora_magnitude_vector:
            continue
        dora, s = mod.lora_magnitude_vector["default"], mod.scaling["default"]
        with torch.no_grad():
            if "default" in mod.lora_embedding_A:
                a, b = mod.lora_embedding_A["default"], mod.lora_embedding_B["default"]
                norm = dora.get_weight_norm(mod.base_layer.weight, dora.get_lora_weight(a.T, b.T), s)
            else:
                a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                norm = dora.get_weight_norm(mod.base_layer.weight, b @ a, s)
            out[name] = dora.weight / norm
    return out


def test_dora_and_model_sites_parse_like_peft(make_peft_adapter, tiny_model_config):
    path, peft_model = make_peft_adapter(r=8, lora_alpha=16, use_dora=True, target_modules=SITES)
    parsed = load_peft_adapter(path, tiny_model_config)
    assert parsed.config.use_dora and parsed.config.target_modules == tuple(SITES)
    assert set(parsed.base_layers) == {"embed_tokens", "lm_head"}  # PEFT saved both base layers
    emb = peft_model.get_base_model().model.embed_tokens
    w = parsed.weights[(MODEL_LAYER, "embed_tokens")]
    assert torch.equal(w.a, emb.lora_embedding_A["default"])
    assert torch.equal(w.b, emb.lora_embedding_B["default"]) and w.scale == emb.scaling["default"]
    assert torch.equal(w.magnitude, emb.lora_magnitude_vector["default"].weight)
    head = peft_model.get_base_model().lm_head
    w = parsed.weights[(MODEL_LAYER, "lm_head")]
    assert torch.equal(w.a, head.lora_A["default"].weight) and torch.equal(w.b, head.lora_B["default"].weight)
    assert w.magnitude.shape == (128,) and len(parsed.weights) == 2 * 4 + 2

    ready = prepare_for_base(parsed, base_weights(peft_model, tiny_model_config))
    assert ready.base_layers == {}  # the same as the base's: dropped
    want = peft_dora_scales(peft_model)
    for (layer, module), lw in ready.weights.items():
        g = want["base_model.model." + weight_name(layer, module).removesuffix(".weight")]
        assert lw.dora_scale.dtype == torch.float32 and (g - 1).abs().max() > 1e-3  # DoRA does something
        torch.testing.assert_close(lw.dora_scale, g, rtol=1e-5, atol=0)


def test_base_layer_that_differs_from_the_base_becomes_a_full_copy(make_peft_adapter, tiny_model_config):
    """PEFT loads the saved base layer into the model: an adapter trained on other embedding weights
    computes ``E'[id] + s A.T[id] B.T``, one module of rank hidden + r that replaces the base's."""
    path, peft_model = make_peft_adapter(r=4, target_modules=["embed_tokens", "q_proj"])
    base = base_weights(peft_model, tiny_model_config)
    edit_tensors(path, lambda t: t[f"{EMB}.base_layer.weight"].__setitem__((3, 5), 7.0))
    parsed = load_peft_adapter(path, tiny_model_config)
    lora = parsed.weights[(MODEL_LAYER, "embed_tokens")]
    copy = prepare_for_base(parsed, base).weights[(MODEL_LAYER, "embed_tokens")]
    assert copy.replace and copy.rank == 64 + 4 and copy.scale == 1.0
    saved = load_file(path / WEIGHTS_NAME)[f"{EMB}.base_layer.weight"]
    ids = torch.tensor([3, 0, 127])
    want = saved[ids] + lora.scale * lora.a.T[ids] @ lora.b.T
    torch.testing.assert_close(copy.a.T[ids] @ copy.b.T, want)
    assert want[0, 5] > 6  # the changed weight is served


def test_dora_over_a_changed_base_layer_is_refused(make_peft_adapter, tiny_model_config):
    path, peft_model = make_peft_adapter(r=4, use_dora=True, target_modules=["lm_head"])
    edit_tensors(path, lambda t: t["base_model.model.lm_head.base_layer.weight"].mul_(2))
    parsed = load_peft_adapter(path, tiny_model_config)
    with pytest.raises(InvalidAdapter, match=r"DoRA on lm_head over a base weight other than the base"):
        prepare_for_base(parsed, base_weights(peft_model, tiny_model_config))


def _put(key: str, value: torch.Tensor):
    return lambda t: t.__setitem__(key, value)


Q = "base_model.model.model.layers.0.self_attn.q_proj"


W = WEIGHTS_NAME


@pytest.mark.parametrize(("edit", "error", "param", "words"), [
    pytest.param(lambda t: t.pop(f"{EMB}.lora_embedding_B"), InvalidAdapter, W,
                 ["embed_tokens has no lora_B", "lora_embedding_B"], id="missing-B"),
    pytest.param(lambda t: t.__setitem__(f"{EMB}.lora_A.weight", t.pop(f"{EMB}.lora_embedding_A")),
                 InvalidAdapter, W, ["lora_embedding_A/B"], id="linear-names"),
    pytest.param(_put(f"{EMB}.base_layer.weight", torch.zeros(130, 64)), AdapterIncompatible, W,
                 ["embed_tokens", "lora_A [r, 130]", "[4, 128]"], id="resized-vocab-but-not-the-lora"),
    pytest.param(_put(f"{EMB}.base_layer.weight", torch.zeros(100, 64)), AdapterIncompatible, W,
                 ["base_layer.weight", "[100, 64]", "at least the base model's 128"], id="smaller-vocab"),
    pytest.param(_put(f"{EMB}.lora_magnitude_vector", torch.ones(64)), InvalidAdapter, "use_dora",
                 ["lora_magnitude_vector", "use_dora=false"], id="magnitude-without-dora"),
    pytest.param(_put(f"{Q}.base_layer.weight", torch.zeros(64, 64)), InvalidAdapter, W,
                 ["only embed_tokens/lm_head"], id="base-layer-of-q"),
    pytest.param(_put(f"{EMB}.weight", torch.zeros(128, 64)), InvalidAdapter, "modules_to_save",
                 ["model.embed_tokens.weight", "full copy", "modules_to_save does not name it"],
                 id="copy-not-in-modules_to_save"),
])
def test_refusals_name_the_tensor(make_peft_adapter, tiny_model_config, edit, error, param, words):
    """Each refusal's message names the tensor, its ``param`` the field (the weights file or the
    config field) an API client gets in ``error.param``."""
    path, _ = make_peft_adapter(r=4, target_modules=["embed_tokens", "q_proj"])
    edit_tensors(path, edit)
    with pytest.raises(error) as info:
        load_peft_adapter(path, tiny_model_config)
    assert info.value.param == param
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_dora_magnitude_of_the_wrong_shape_is_refused(make_peft_adapter, tiny_model_config):
    path, _ = make_peft_adapter(r=4, use_dora=True, target_modules=["lm_head"])
    edit_tensors(path, _put("base_model.model.lm_head.lora_magnitude_vector", torch.ones(64)))
    with pytest.raises(InvalidAdapter, match=r"lm_head\.lora_magnitude_vector has shape \[64\].*\[128\]"):
        load_peft_adapter(path, tiny_model_config)
