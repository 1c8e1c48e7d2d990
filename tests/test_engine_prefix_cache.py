"""Prefix caching end to end on a tiny random Llama with real PEFT adapters: a request's tokens never
depend on what was cached, under which adapter, or which version of it."""

import pytest
import torch
from peft import LoraConfig

from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams
from tests.engine_helpers import engine_logits, hf_greedy, run_all, tiny_llama_dir
from tests.peft_helpers import build_adapters, peft_greedy

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONFIGS = {"v1": LoraConfig(r=8, lora_alpha=16, target_modules=QKVO),
           "v2": LoraConfig(r=8, lora_alpha=16, target_modules=QKVO)}  # same shape, other weights
SYSTEM = [(7 * i) % 200 + 20 for i in range(40)]  # a shared 40-token "system prompt": 2 full blocks + 8
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("prefix")
    model_dir, base = tiny_llama_dir(tmp / "model", smollm2_tokenizer_dir)
    models, paths = build_adapters(base, CONFIGS, tmp / "adapters", std=0.3)

    def engine(caching: bool, name: str, **kw) -> LLMEngine:
        cfg = dict(model=str(model_dir), pool_bytes=8 * 2**20, max_num_batched_tokens=64,
                   adapter_store_dir=str(tmp / name), enable_prefix_caching=caching)
        e = LLMEngine(EngineConfig(**{**cfg, **kw}))
        for adapter, path in paths.items():
            e.add_adapter(adapter, path)
        return e

    def oracle(adapter, prompt, n=10):
        return peft_greedy(models, base, adapter, prompt, n)[0]

    return engine, oracle, paths, base


def hits(engine: LLMEngine) -> int:
    return engine.stats().prefix_cache.hits


def test_half_cached_prefix_same_tokens_as_uncached(setup):
    make, oracle, _, _ = setup
    on, off = make(True, "on"), make(False, "off")
    first = SYSTEM + [3, 4, 5, 6] * 6  # 64 tokens
    second = first[:32] + [9, 8, 7, 6] * 8  # its first 2 blocks are first's, the rest is new
    for adapter in (None, "v1"):
        run_all(on, {"first": first}, GREEDY, {"first": adapter})
        before = hits(on)
        got = run_all(on, {"second": second}, GREEDY, {"second": adapter})["second"]
        assert hits(on) - before == 32  # half of its 64 tokens came from the cache
        assert got == run_all(off, {"second": second}, GREEDY, {"second": adapter})["second"]
        assert got == oracle(adapter, second), adapter
    assert hits(off) == 0 and off.stats().prefix_cache.blocks == 0
    assert on.pool.used("kv") == 0 and on.pool.used("cached") > 0
    # the logits at the last prompt position, computed over a cached prefix, match uncached ones
    torch.testing.assert_close(engine_logits(on, second), engine_logits(off, second), atol=1e-4, rtol=0)


def test_same_prompt_under_two_adapters_and_base_in_one_batch(setup):
    make, oracle, _, _ = setup
    on = make(True, "mixed")
    prompt = SYSTEM + [11, 12, 13]
    names = {"a": "v1", "b": "v2", "c": None, "d": "v1", "e": "v2", "f": None}
    got = run_all(on, dict.fromkeys(names, prompt), GREEDY, names)
    for rid, adapter in names.items():
        assert got[rid] == oracle(adapter, prompt), (rid, adapter)
    assert len({tuple(got[r]) for r in "abc"}) == 3  # the adapters really differ
    # d, e, f read the 2 prompt blocks a, b, c cached in the same step; each adapter version also
    # cached the block that 43 prompt + 10 output tokens filled next (d's, e's, f's stayed private)
    assert hits(on) == 3 * 32 and on.stats().prefix_cache.blocks == 3 * 3


def test_replaced_adapter_never_reuses_the_old_versions_kv(setup):
    make, oracle, paths, _ = setup
    on = make(True, "replace")
    on.add_adapter("x", paths["v1"])
    prompt = SYSTEM + [1, 2, 3]
    assert run_all(on, {"r": prompt}, GREEDY, {"r": "x"})["r"] == oracle("v1", prompt)
    assert run_all(on, {"r": prompt}, GREEDY, {"r": "x"})["r"] == oracle("v1", prompt)
    assert hits(on) == 32
    on.add_adapter("x", paths["v2"], replace=True)  # same name, new version (new uid)
    assert run_all(on, {"r": prompt}, GREEDY, {"r": "x"})["r"] == oracle("v2", prompt)
    stats = on.stats().prefix_cache
    # no hit for the new version; the old version's 3 blocks (2 of prompt, 1 filled while
    # decoding) were dropped at once, and the new version cached its own 3
    assert (stats.hits, stats.blocks_dropped, stats.blocks) == (32, 3, 3)


def test_replace_while_the_old_version_still_runs(setup):
    # vLLM #42495: the old version's blocks are still cached (a request reads them) when the new
    # version's first request arrives; keyed by uid, it must not find them.
    make, oracle, paths, _ = setup
    on = make(True, "replace-live")
    on.add_adapter("x", paths["v1"])
    prompt = SYSTEM + [1, 2, 3]
    on.add_request(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), "x", "old")
    old = [t for out in on.step() for t in out.new_token_ids]
    on.add_adapter("x", paths["v2"], replace=True)
    got = {"old": old, "new": []}
    on.add_request(prompt, GREEDY, "x", "new")
    while on.has_work():
        for out in on.step():
            got[out.request_id].extend(out.new_token_ids)
    assert got["new"] == oracle("v2", prompt)
    assert got["old"] == oracle("v1", prompt, 30)
    assert hits(on) == 0


def test_seeded_sampling_unaffected_by_cached_prefix(setup):
    make, _, _, _ = setup
    on, off = make(True, "seed-on"), make(False, "seed-off")
    prompt = SYSTEM + [5, 6]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    want = run_all(off, {"s": prompt}, seeded, {"s": "v2"})["s"]
    run_all(on, {"warm": prompt}, GREEDY, {"warm": "v2"})
    assert run_all(on, {"s": prompt}, seeded, {"s": "v2"})["s"] == want
    crowd = {"s": prompt, "x": SYSTEM + [9], "y": SYSTEM}
    assert run_all(on, crowd, seeded, {"s": "v2", "x": "v2", "y": None})["s"] == want
    assert hits(on) >= 3 * 32


def test_preemption_in_a_tiny_pool_recomputes_over_the_cache(setup):
    make, _, _, base = setup
    # 3 layers x 16-token blocks, 4 KiB pages: 24 pages = 8 blocks for five 3-block requests
    on = make(True, "tiny-pool", pool_bytes=24 * 4096)
    on.remove_adapter("v1")
    on.remove_adapter("v2")  # no adapter pages: the pool is all KV
    prompts = {f"r{i}": SYSTEM[:16] + [3 + i, 20 + i, 40 + i] * 2 for i in range(5)}
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    got = run_all(on, prompts, params)
    assert on.scheduler.preemptions_total > 0 and hits(on) > 0
    for rid, prompt in prompts.items():
        assert got[rid] == hf_greedy(base, prompt, 24)[0], rid
    assert on.pool.used("kv") == 0 and on.pool.num_free == on.pool.num_pages
