"""DoRA and LoRA on embed_tokens / lm_head in mixed batches on a tiny random Llama, against PEFT.

PEFT cannot mix these adapters in one batch (``adapter_names`` refuses DoRA), so each request is
compared with PEFT running its adapter alone: greedy tokens identical, logits within 1e-3 (fp32), in
every backend (the reference torch one, the C kernel, and Triton).
The model has a vocabulary of 300 and pages of 256 elements (block_size 4), so lm_head's B^T and
DoRA scale rows (vocab-long) are stored in two page-long pieces. One engine per LoRA backend; the
Triton one runs under TRITON_INTERPRET=1 on CPU (slow).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

from kernels.native_lib import available as native_available
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams
from tests.engine_helpers import hf_greedy, run_all, run_all_logits, tiny_llama_dir
from tests.peft_helpers import build_adapters

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "dora_qv": LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "dora_all": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=ALL),
    "plain": LoraConfig(r=4, lora_alpha=8, target_modules=ALL),
    "emb_head": LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head", "o_proj"]),
    "dora_emb_head": LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                target_modules=["embed_tokens", "lm_head", "down_proj", "k_proj"]),
    "head16": LoraConfig(r=16, lora_alpha=8, target_modules=["lm_head"]),
    "emb2": LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["embed_tokens"]),
}
TIED = {  # on a base whose lm_head is its embedding
    "t_emb_head": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    "t_dora_head": LoraConfig(r=8, lora_alpha=8, use_dora=True, target_modules=["lm_head", "up_proj"]),
}
PROMPTS = [[5, 9, 3], list(range(10, 40)), [280, 3, 299], [7, 7, 8, 9, 100]]
N = 8
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("native", id="native",
                 marks=pytest.mark.skipif(not native_available(), reason="no C kernel")),
    pytest.param("triton", id="triton", marks=pytest.mark.slow),
]


def _undora(src, dst) -> None:
    """The same adapter without DoRA: the magnitudes dropped, use_dora=false."""
    shutil.copytree(src, dst)
    tensors = {k: v for k, v in load_file(dst / "adapter_model.safetensors").items()
               if "lora_magnitude_vector" not in k}
    save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_tokenizer_dir):
    """(model dir, base, {adapter: PEFT model}, {adapter: dir}) for the untied and the tied base."""
    tmp = tmp_path_factory.mktemp("lora_sites")
    out = {}
    for tied, configs in ((False, CONFIGS), (True, TIED)):
        model_dir, base = tiny_llama_dir(tmp / f"model-{tied}", smollm2_tokenizer_dir, vocab_size=300,
                                         num_hidden_layers=2, tie_word_embeddings=tied)
        peft, paths = build_adapters(base, configs, tmp / f"adapters-{tied}", std=0.3, seed=int(tied))
        if not tied:
            _undora(paths["dora_all"], tmp / "undora")
            peft["undora"] = PeftModel.from_pretrained(copy.deepcopy(base), tmp / "undora").eval()
            paths["undora"] = tmp / "undora"
        out[tied] = (model_dir, base, peft, paths)
    return out


def _engine(models, tied: bool, backend: str, tmp_path) -> LLMEngine:
    model_dir, _, _, paths = models[tied]
    engine = LLMEngine(EngineConfig(
        model=str(model_dir), pool_bytes=4 * 2**20, block_size=4, max_num_batched_tokens=32,
        lora_backend=backend, kernel_backend="triton" if backend == "triton" else None,
        adapter_store_dir=str(tmp_path / f"store-{tied}-{backend}")))
    assert engine.layout.page_elems == 256 and engine.runner.lora.name == backend
    for name, path in paths.items():
        engine.add_adapter(name, path)
    return engine


_ORACLE: dict[tuple, tuple[list[int], torch.Tensor]] = {}


def _oracle(models, tied: bool, adapter: str | None, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """PEFT running ``adapter`` alone (memoized: every backend's test compares with the same)."""
    key = (tied, adapter, tuple(prompt))
    if key not in _ORACLE:
        _, base, peft, _ = models[tied]
        _ORACLE[key] = hf_greedy(base if adapter is None else peft[adapter], prompt, N)
    return _ORACLE[key]


def _requests(names: list[str | None], twice: bool) -> tuple[dict[str, list[int]], dict[str, str | None]]:
    """Every adapter on the same short prompt (so DoRA and the same adapter without it compare
    directly), and with ``twice`` once more on another prompt."""
    prompts, adapters = {}, {}
    for i, name in enumerate(names):
        for k, prompt in enumerate([PROMPTS[3], PROMPTS[i % 3]][:1 + twice]):
            prompts[f"{name}-{k}"], adapters[f"{name}-{k}"] = prompt, name
    return prompts, adapters


def _mixed_against_peft(models, tied: bool, engine: LLMEngine, names: list[str | None], twice: bool):
    """Run ``_requests(names, twice)`` at once; assert each request's greedy tokens equal PEFT's with
    its adapter alone and its first logits are within 1e-3. Returns (logits, steps, adapters)."""
    prompts, adapters = _requests(names, twice)
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    got, logits, steps = run_all_logits(engine, prompts, params, adapters)
    for rid, prompt in prompts.items():
        want_tokens, want_logits = _oracle(models, tied, adapters[rid], prompt)
        assert got[rid] == want_tokens, (rid, adapters[rid])
        torch.testing.assert_close(logits[rid], want_logits, atol=1e-3, rtol=0, msg=rid)
    return logits, steps, adapters


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_matches_peft_alone_and_dora_changes_output(models, backend, tmp_path):
    """DoRA, plain LoRA, embedding/head LoRA and base requests share steps; each request's greedy
    tokens equal PEFT running its adapter alone and its logits are within 1e-3 of PEFT's."""
    engine = _engine(models, False, backend, tmp_path)
    # the interpreter is slow: one request per adapter for Triton
    logits, steps, adapters = _mixed_against_peft(models, False, engine, [*CONFIGS, "undora", None],
                                                  twice=backend != "triton")
    # the batches really mixed DoRA, plain LoRA and base requests
    kinds = [{adapters[rid] for rid in step} for step in steps]
    assert any({"dora_all", "dora_qv", "plain", None} <= k for k in kinds), kinds
    # DoRA changes what the same A and B compute, and every adapter changes the base output
    assert (logits["dora_all-0"] - logits["undora-0"]).abs().max() > 0.05
    for name in CONFIGS:
        assert (logits[f"{name}-0"] - logits["None-0"]).abs().max() > 0.05, name
    assert engine.pool.used("kv") == 0


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_tied_base_embedding_and_head(models, backend, tmp_path):
    _mixed_against_peft(models, True, _engine(models, True, backend, tmp_path), [*TIED, None], twice=True)


def test_adapter_info_reports_parts_and_their_sizes(models, tmp_path):
    """Parts by kind with exact byte sizes (fp32, tiny model: hidden 64, vocab 300, 2 layers, pages of
    256 elements); the pool bytes reported are the pages the adapter takes once resident."""
    engine = _engine(models, False, "torch", tmp_path)
    info = engine.get_adapter("dora_emb_head")  # r=4: embed_tokens, lm_head, down_proj, k_proj; DoRA
    assert info.use_dora and info.location == "host"
    parts = {p.name: p for p in info.parts}
    assert list(parts) == ["layers", "embed_tokens", "lm_head", "dora_scale"]
    assert parts["layers"].modules == ("k_proj", "down_proj") and parts["layers"].rank == 4
    assert parts["layers"].bytes == 4 * 2 * 4 * ((96 + 64) + (64 + 32))  # 2 layers x (down + k)
    assert parts["embed_tokens"].bytes == 4 * 4 * (300 + 64)
    assert parts["lm_head"].bytes == 4 * 4 * (64 + 300)
    assert parts["dora_scale"].modules == ("k_proj", "down_proj", "embed_tokens", "lm_head")
    assert parts["dora_scale"].bytes == 4 * (2 * (64 + 32) + 64 + 300)
    # page rows of the parts (pages of 256 elements): embed_tokens' A.T is 300 rows of 4 + B^T 4 rows
    # of 64; lm_head's A 4 rows of 64 + B^T 4 rows of 300 cut in 2 pieces: 8 rows of 256
    assert parts["embed_tokens"].pool_bytes == 4 * (300 * 4 + 4 * 64)
    assert parts["lm_head"].pool_bytes == 4 * (4 * 64 + 8 * 256)
    assert parts["layers"].pool_bytes == parts["layers"].bytes
    assert parts["dora_scale"].pool_bytes == 4 * (2 * (64 + 32) + 64 + 2 * 256)  # lm_head's g: 2 pieces
    assert not any(p.full_copy for p in info.parts) and info.vocab_size == 300 and info.rank == 4
    plain = engine.get_adapter("plain")
    assert not plain.use_dora and [p.name for p in plain.parts] == ["layers"]
    run_all(engine, {"x": PROMPTS[0]}, SamplingParams(max_tokens=1, temperature=0), {"x": "dora_emb_head"})
    table = engine.scheduler.residency.page_table(info.uid)
    # the adapter's pages, rows packed by length (server/adapter_packing.py): rows of 256 (lm_head's
    # B^T and g pieces: 10 pages), of 96 (down's A: 8 rows, 2 a page: 4), of 64 (27 rows, 4 a page:
    # 7), of 32 (k's B^T and g: 10 rows, 8 a page: 2), of 4 (embed A.T: 300 rows, 64 a page: 5)
    assert info.pool_bytes == len(table.all_pages()) * 1024 == (10 + 4 + 7 + 2 + 5) * 1024
    assert sum(p.pool_bytes for p in info.parts) <= info.pool_bytes
    assert engine.get_adapter("dora_emb_head").location == "device"
