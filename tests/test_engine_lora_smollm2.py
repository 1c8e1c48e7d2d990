"""PEFT adapters on the real SmolLM2: our tokens and logits against transformers + PEFT."""


import pytest
import torch
from peft import LoraConfig

from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams
from tests.engine_helpers import engine_logits, run_all
from tests.peft_helpers import build_adapters, peft_greedy

pytestmark = pytest.mark.slow

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "qv8": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all16": LoraConfig(r=16, lora_alpha=32, target_modules=ALL),
    "r1": LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj", "down_proj"]),
    "r64": LoraConfig(r=64, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "rslora": LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=ALL),
    "layers": LoraConfig(r=8, lora_alpha=16, target_modules=ALL, layers_to_transform=[0, 5, 17, 29]),
    "pattern": LoraConfig(r=8, lora_alpha=16, target_modules=ALL, rank_pattern={"o_proj": 4, "up_proj": 24},
                          alpha_pattern={"down_proj": 64}),
    "alllin": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
}
TEXTS = ["The capital of France is", "List three colors:", "def add(a, b):", "Tell me a story about a cat"]


@pytest.fixture(scope="module")
def setup(smollm2_hf_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_smol")
    base = smollm2_hf_model  # build_adapters wraps copies; the shared model stays untouched
    models, paths = build_adapters(base, CONFIGS, tmp / "adapters", std=0.05)
    engine = LLMEngine(EngineConfig(model=None, pool_bytes=128 * 2**20, max_num_batched_tokens=64,
                                    adapter_store_dir=str(tmp / "store")))
    for adapter, path in paths.items():
        engine.add_adapter(adapter, path)
    return engine, models, base


def test_mixed_adapters_and_base_match_peft(setup):
    engine, models, base = setup
    names = [*CONFIGS, None, None]
    prompts, adapters = {}, {}
    for i, adapter in enumerate(names):
        prompts[f"r{i}"] = engine.tokenizer.encode(TEXTS[i % len(TEXTS)])
        adapters[f"r{i}"] = adapter
    got = run_all(engine, prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), adapters)
    differs = 0
    base_tokens = {}
    for rid, prompt in prompts.items():
        want, _ = peft_greedy(models, base, adapters[rid], prompt, 16)
        assert got[rid] == want, (rid, adapters[rid])
        key = tuple(prompt)
        if key not in base_tokens:
            base_tokens[key] = peft_greedy(models, base, None, prompt, 16)[0]
        differs += adapters[rid] is not None and want != base_tokens[key]
    assert differs >= 6  # the adapters really change what the model says
    assert engine.pool.used("kv") == 0


@pytest.mark.parametrize("adapter", list(CONFIGS))
def test_logits_close_to_peft(setup, adapter):
    engine, models, base = setup
    prompt = engine.tokenizer.encode(TEXTS[1])
    ours = engine_logits(engine, prompt, adapter)
    _, theirs = peft_greedy(models, base, adapter, prompt, 1)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
