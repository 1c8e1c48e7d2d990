"""Full copies of embed_tokens / lm_head (``modules_to_save``, added tokens) in mixed batches, vs PEFT.

An adapter trained after ``resize_token_embeddings`` (8 added tokens) carries a whole embedding and
head of 308 rows; the server's base model keeps its 300. Requests of that adapter may use and
produce the added ids; requests of the base and of other adapters in the same steps see the base
vocabulary. Also: an adapter whose saved base embedding differs from the base's (PEFT loads it) is
served with that embedding plus its LoRA; a tied base with a copy of the embedding only.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from kernels.native_lib import available as native_available
from server.config import EngineConfig
from server.engine import LLMEngine
from server.errors import InvalidRequest
from server.sampling_params import SamplingParams
from tests.engine_helpers import engine_logits, hf_greedy, run_all, run_all_logits, tiny_llama_dir
from tests.peft_helpers import build_adapters

VOCAB, ADDED, N = 300, 8, 8
PROMPTS = {"copy_a": [5, 9, 300, 3], "copy_b": [307, 20, 21, 22, 23, 24], "base": [5, 9, 3],
           "lora": list(range(10, 30)), "changed": [7, 7, 8, 299]}
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("native", id="native",
                 marks=pytest.mark.skipif(not native_available(), reason="no C kernel")),
    pytest.param("triton", id="triton", marks=pytest.mark.slow),
]


def _resized_copy_adapter(base, out):
    """PEFT on the base resized by ADDED tokens, q_proj LoRA + full copies of embed_tokens and
    lm_head, "trained": copies perturbed, the added tokens' head rows made likely."""
    torch.manual_seed(3)
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(VOCAB + ADDED)
    model = get_peft_model(resized, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                               modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.3)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
                if "lm_head" in name:
                    param[VOCAB:] *= 4.0
    model.save_pretrained(out)
    return model.eval()


def _changed_base_layer_adapter(base, out, build):
    """LoRA on embed_tokens whose saved base embedding differs from the base's; PEFT loads it."""
    _, paths = build(base, {"changed": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"])}, out,
                     std=0.3)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors = load_file(paths["changed"] / "adapter_model.safetensors")
    noise = torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(5))
    tensors[key] = tensors[key] + 0.1 * noise
    save_file(tensors, paths["changed"] / "adapter_model.safetensors", metadata={"format": "pt"})
    return PeftModel.from_pretrained(copy.deepcopy(base), paths["changed"]).eval(), paths["changed"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("full_copies")
    model_dir, base = tiny_llama_dir(tmp / "model", smollm2_tokenizer_dir, vocab_size=VOCAB,
                                     num_hidden_layers=2)
    peft = {"copy": _resized_copy_adapter(base, tmp / "copy")}
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["v_proj"])
    lora, lora_paths = build_adapters(base, {"lora": config}, tmp / "lora", std=0.3)
    peft["lora"] = lora["lora"]
    peft["changed"], changed_dir = _changed_base_layer_adapter(base, tmp / "changed", build_adapters)
    paths = {"copy": tmp / "copy", "lora": lora_paths["lora"], "changed": changed_dir}
    return tmp, model_dir, base, peft, paths


def _engine(setup, backend, store):
    _, model_dir, _, _, paths = setup
    engine = LLMEngine(EngineConfig(model=str(model_dir), pool_bytes=8 * 2**20, block_size=4,
                                    max_num_batched_tokens=16, lora_backend=backend,
                                    kernel_backend="triton" if backend == "triton" else None,
                                    adapter_store_dir=str(store)))
    for name, path in paths.items():
        engine.add_adapter(name, path)
    return engine


ADAPTER_OF = {"copy_a": "copy", "copy_b": "copy", "base": None, "lora": "lora", "changed": "changed"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_copies_with_added_tokens_in_a_mixed_batch(setup, backend, tmp_path):
    """Tokens identical to PEFT and logits within 1e-3, each request in the same steps as the
    others; a step's logits are as wide as its widest adapter vocabulary, -inf past a request's own."""
    _, _, base, peft, _ = setup
    engine = _engine(setup, backend, tmp_path)
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logprobs=2)
    got, logits, steps = run_all_logits(engine, PROMPTS, params, ADAPTER_OF)
    for rid, prompt in PROMPTS.items():
        adapter = ADAPTER_OF[rid]
        want_tokens, want_logits = hf_greedy(base if adapter is None else peft[adapter], prompt, N)
        assert got[rid] == want_tokens, rid
        width = len(want_logits)
        torch.testing.assert_close(logits[rid][:width], want_logits, atol=1e-3, rtol=0, msg=rid)
        assert bool((logits[rid][width:] == float("-inf")).all()), rid
    assert any({"copy", "lora", None} <= {ADAPTER_OF[rid] for rid in step} for step in steps)
    assert any(t >= VOCAB for rid in ("copy_a", "copy_b") for t in got[rid])  # added tokens are generated
    assert all(t < VOCAB for rid in ("base", "lora", "changed") for t in got[rid])
    assert engine.pool.used("kv") == 0


def test_vocabulary_and_sizes_per_adapter(setup, tmp_path):
    _, _, _, peft, _ = setup
    engine = _engine(setup, "native" if native_available() else "torch", tmp_path)
    logits = engine_logits(engine, PROMPTS["copy_b"], "copy")  # alone: as wide as the adapter's vocabulary
    assert logits.shape == (VOCAB + ADDED,)
    torch.testing.assert_close(logits, hf_greedy(peft["copy"], PROMPTS["copy_b"], 1)[1], atol=1e-3, rtol=0)
    params = SamplingParams(max_tokens=2, temperature=0)
    for adapter in (None, "lora"):
        with pytest.raises(InvalidRequest, match=rf"\[0, {VOCAB}\)"):
            engine.add_request([5, VOCAB], params, adapter)
    with pytest.raises(InvalidRequest, match=rf"\[0, {VOCAB + ADDED}\)"):
        engine.add_request([5, VOCAB + ADDED], params, "copy")
    info = engine.get_adapter("copy")
    parts = {p.name: p for p in info.parts}
    # copies: the embedding 308 rows of 64 (+ a 64 x 64 identity), the head likewise; fp32
    assert parts["embed_tokens"].bytes == parts["lm_head"].bytes == 4 * 64 * (VOCAB + ADDED + 64)
    assert parts["embed_tokens"].modules == ("embed_tokens",) and parts["layers"].modules == ("q_proj",)
    assert parts["embed_tokens"].full_copy and parts["lm_head"].full_copy and not parts["layers"].full_copy
    # the LoRA's targets and rank, not the copies'; requests may use the added ids
    assert info.target_modules == ("q_proj",) and info.rank == 4 and info.vocab_size == VOCAB + ADDED
    changed = engine.get_adapter("changed")  # LoRA on embed_tokens over a changed base embedding
    assert changed.target_modules == ("embed_tokens",) and changed.rank == 4 and changed.vocab_size == VOCAB
    assert [(p.name, p.full_copy) for p in changed.parts] == [("embed_tokens", True)]


def test_changed_embedding_of_a_tied_base_changes_the_head_too(tmp_path, smollm2_tokenizer_dir):
    """PEFT loads a saved base embedding into a tied model's one shared weight: its head changes too."""
    model_dir, base = tiny_llama_dir(tmp_path / "model", smollm2_tokenizer_dir, vocab_size=VOCAB,
                                     num_hidden_layers=2, tie_word_embeddings=True)
    peft, path = _changed_base_layer_adapter(base, tmp_path / "adapters", build_adapters)
    engine = LLMEngine(EngineConfig(model=str(model_dir), pool_bytes=8 * 2**20, block_size=4,
                                    adapter_store_dir=str(tmp_path / "store")))
    engine.add_adapter("changed", path)
    assert {p.name for p in engine.get_adapter("changed").parts} == {"embed_tokens", "lm_head"}
    prompt = PROMPTS["changed"]
    torch.testing.assert_close(engine_logits(engine, prompt, "changed"), hf_greedy(peft, prompt, 1)[1],
                               atol=1e-3, rtol=0)
    got = run_all(engine, {"x": prompt}, SamplingParams(max_tokens=N, temperature=0, ignore_eos=True),
                  {"x": "changed"})
    assert got["x"] == hf_greedy(peft, prompt, N)[0]
