"""Engine end to end on tiny random Llamas saved as HF dirs, against transformers."""

import pytest

from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams
from tests.engine_helpers import hf_greedy, run_all, tiny_llama_dir

PROMPTS = {"p0": [5, 9, 3], "p1": list(range(10, 47)), "p2": [200], "p3": [7, 7, 7, 7, 8, 9, 100, 101]}


def _tiny_dir(tmp_path, tokenizer_dir, tied: bool, kv_heads: int = 2, **kw):
    return tiny_llama_dir(tmp_path / "model", tokenizer_dir, tie_word_embeddings=tied,
                          num_key_value_heads=kv_heads, **kw)


@pytest.mark.parametrize("tied,kv_heads", [(False, 2), (True, 1), (False, 4)])
def test_greedy_matches_transformers(tmp_path, smollm2_tokenizer_dir, tied, kv_heads):
    path, hf = _tiny_dir(tmp_path, smollm2_tokenizer_dir, tied, kv_heads=kv_heads)
    engine = LLMEngine(EngineConfig(model=str(path), pool_bytes=4 * 2**20, max_num_batched_tokens=16,
                                    adapter_store_dir=str(tmp_path / "store")))
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    got = run_all(engine, PROMPTS, params)
    for rid, prompt in PROMPTS.items():
        want, _ = hf_greedy(hf, prompt, 20)
        assert got[rid] == want, rid
    assert engine.pool.num_free == engine.pool.num_pages


def test_llama3_rope_scaling_matches(tmp_path, smollm2_tokenizer_dir):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    path, hf = _tiny_dir(tmp_path, smollm2_tokenizer_dir, False, rope_scaling=scaling, rope_theta=500000.0)
    engine = LLMEngine(EngineConfig(model=str(path), pool_bytes=4 * 2**20,
                                    adapter_store_dir=str(tmp_path / "store")))
    assert engine.model_config.rope_scaling is not None
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = run_all(engine, {"p1": PROMPTS["p1"]}, params)
    assert got["p1"] == hf_greedy(hf, PROMPTS["p1"], 12)[0]


def test_preemption_with_tiny_pool_gives_same_tokens(tmp_path, smollm2_tokenizer_dir):
    path, hf = _tiny_dir(tmp_path, smollm2_tokenizer_dir, False)
    # 3 layers x 16-token blocks; a page is 2*16*2*16 fp32 = 4 KiB: 24 pages = 8 blocks in all
    engine = LLMEngine(EngineConfig(model=str(path), pool_bytes=24 * 4096, max_num_batched_tokens=64,
                                    adapter_store_dir=str(tmp_path / "store")))
    prompts = {f"r{i}": [3 + i, 20 + i, 40 + i] * 5 for i in range(5)}
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    got = run_all(engine, prompts, params)
    assert engine.scheduler.preemptions_total > 0
    for rid, prompt in prompts.items():
        assert got[rid] == hf_greedy(hf, prompt, 24)[0], rid
    assert engine.pool.num_free == engine.pool.num_pages


def test_abort_mid_decode_and_seeded_sampling(tmp_path, smollm2_tokenizer_dir):
    path, _ = _tiny_dir(tmp_path, smollm2_tokenizer_dir, False)
    engine = LLMEngine(EngineConfig(model=str(path), pool_bytes=4 * 2**20,
                                    adapter_store_dir=str(tmp_path / "store")))
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), request_id="a")
    for _ in range(3):
        engine.step()
    assert engine.pool.num_free < engine.pool.num_pages
    out = engine.abort("a")
    assert out.finished and out.finish_reason == "abort"
    assert engine.pool.num_free == engine.pool.num_pages and not engine.has_work()
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    alone = run_all(engine, {"s": [4, 5, 6]}, seeded)["s"]
    crowd = {"s": [4, 5, 6], "x": [9, 9], "y": [1, 2, 3, 4]}
    together = run_all(engine, crowd, seeded)
    assert together["s"] == alone
