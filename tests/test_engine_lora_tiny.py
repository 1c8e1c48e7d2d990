"""Many adapters in one batch on a tiny random Llama, against transformers + PEFT."""

import os
import time

import pytest
from peft import LoraConfig

from server.config import EngineConfig
from server.engine import LLMEngine
from server.errors import UnknownAdapter
from server.sampling_params import SamplingParams
from tests.engine_helpers import run_all, tiny_llama_dir
from tests.peft_helpers import build_adapters, peft_greedy

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "qv8": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all16": LoraConfig(r=16, lora_alpha=16, target_modules=ALL),
    "r1": LoraConfig(r=1, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
    "r64": LoraConfig(r=64, lora_alpha=32, target_modules=["q_proj", "k_proj", "gate_proj"]),
    "rslora": LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=["v_proj", "up_proj"]),
    "layers": LoraConfig(r=4, lora_alpha=8, target_modules=ALL, layers_to_transform=[1]),
    "pattern": LoraConfig(r=4, lora_alpha=8, target_modules=ALL, rank_pattern={"down_proj": 12},
                          alpha_pattern={"q_proj": 2}),
    "alllin": LoraConfig(r=2, lora_alpha=8, target_modules="all-linear"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("lora_tiny")
    model_dir, base = tiny_llama_dir(tmp / "model", smollm2_tokenizer_dir)
    models, paths = build_adapters(base, CONFIGS, tmp / "adapters", std=0.3)
    engine = LLMEngine(EngineConfig(model=str(model_dir), pool_bytes=8 * 2**20, max_num_batched_tokens=32,
                                    adapter_store_dir=str(tmp / "store")))
    for name, path in paths.items():
        engine.add_adapter(name, path)
    return engine, lambda adapter, prompt, n: peft_greedy(models, base, adapter, prompt, n)


PROMPTS = [[5, 9, 3], list(range(10, 40)), [200, 3], [7, 7, 8, 9, 100]]


def test_each_adapter_alone_matches_peft(setup):
    engine, oracle = setup
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for name in CONFIGS:
        got = run_all(engine, {"x": PROMPTS[1]}, params, {"x": name})
        want, _ = oracle(name, PROMPTS[1], 12)
        assert got["x"] == want, name


def test_mixed_batch_matches_each_alone(setup):
    engine, oracle = setup
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    names = [*CONFIGS, None, None]
    prompts, adapters = {}, {}
    for i, name in enumerate(names * 2):  # every adapter twice, with different prompts, plus base
        rid = f"r{i}"
        prompts[rid] = PROMPTS[i % len(PROMPTS)]
        adapters[rid] = name
    got = run_all(engine, prompts, params, adapters)
    distinct = {a for a in adapters.values() if a}
    assert len(distinct) == 8
    for rid, prompt in prompts.items():
        want, _ = oracle(adapters[rid], prompt, 12)
        assert got[rid] == want, (rid, adapters[rid])
    assert engine.pool.used("kv") == 0


def test_adapters_change_outputs_and_unknown_is_refused(setup):
    engine, _ = setup
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = run_all(engine, {"a": PROMPTS[0], "b": PROMPTS[0]}, params, {"a": "all16", "b": None})
    assert outs["a"] != outs["b"]
    with pytest.raises(UnknownAdapter, match="does-not-exist"):
        engine.add_request(PROMPTS[0], params, "does-not-exist")


def test_delete_and_readd_gets_new_uid_and_new_weights(setup, tmp_path):
    engine, oracle = setup
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    old_uid = engine.get_adapter("qv8").uid
    engine.add_request(PROMPTS[0], params, "qv8", request_id="inflight")
    tokens = [t for out in engine.step() for t in out.new_token_ids]
    engine.remove_adapter("qv8")  # the running request finishes on the old weights
    with pytest.raises(UnknownAdapter):
        engine.add_request(PROMPTS[0], params, "qv8")
    while engine.has_work():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    assert tokens == oracle("qv8", PROMPTS[0], 8)[0]
    # re-add the "r1" weights under the old name: a new uid, and r1's outputs, not qv8's
    engine.add_adapter("qv8", engine.adapters.resolve("r1").path)
    assert engine.get_adapter("qv8").uid != old_uid
    got = run_all(engine, {"y": PROMPTS[0]}, params, {"y": "qv8"})
    assert got["y"] == oracle("r1", PROMPTS[0], 8)[0]
    engine.step()  # retire the old uid
    assert not engine.scheduler.residency.is_resident(old_uid)


def test_restart_keeps_store_and_cold_adapter_loads_while_others_run(setup, tmp_path):
    engine, oracle = setup
    store_dir = engine.config.adapter_store_dir
    # cold_start_wait=0: the first step doesn't wait for the read (tests/test_scheduler_cold_start.py)
    fresh = LLMEngine(EngineConfig(model=engine.config.model, pool_bytes=8 * 2**20,
                                   adapter_store_dir=store_dir, cold_start_wait=0.0))
    assert {a.adapter_id for a in fresh.list_adapters()} >= {"all16", "r64", "pattern"}
    assert fresh.get_adapter("all16").location == "disk"
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    fresh.add_request(PROMPTS[0], params, None, request_id="base")
    fresh.add_request(PROMPTS[1], params, "all16", request_id="cold")
    first = fresh.step()  # base runs whether or not the loader thread has read the cold adapter yet
    assert "base" in [o.request_id for o in first]
    got = {"base": [], "cold": []}
    for out in first:
        got[out.request_id].extend(out.new_token_ids)
    while fresh.has_work():
        for out in fresh.step():
            got[out.request_id].extend(out.new_token_ids)
    assert got["cold"] == oracle("all16", PROMPTS[1], 6)[0]
    assert got["base"] == oracle(None, PROMPTS[0], 6)[0]
    assert fresh.get_adapter("all16").location == "device"
    assert fresh.get_adapter("all16").requests_served == 1


def test_a_cold_adapter_is_read_from_disk_from_admission_on(setup):
    """A lone request's adapter load starts when it is admitted, not at the engine's first step."""
    engine, _ = setup
    fresh = LLMEngine(EngineConfig(model=engine.config.model, pool_bytes=8 * 2**20,
                                   adapter_store_dir=engine.config.adapter_store_dir))
    assert fresh.get_adapter("r64").location == "disk"
    fresh.add_request(PROMPTS[0], SamplingParams(max_tokens=1, temperature=0), "r64", request_id="x")
    deadline = time.monotonic() + 30
    while fresh.get_adapter("r64").location == "disk" and time.monotonic() < deadline:
        time.sleep(0.01)  # no step is made
    assert fresh.get_adapter("r64").location == "host"
    while fresh.has_work():
        fresh.step()
    assert fresh.get_adapter("r64").location == "device"


def test_adapter_larger_than_the_pool_is_refused_at_upload(setup, tmp_path):
    from server.errors import AdapterTooLarge

    engine, _ = setup
    small = LLMEngine(EngineConfig(model=engine.config.model, pool_bytes=64 * 4096,
                                   adapter_store_dir=str(tmp_path / "store")))
    big = engine.adapters.resolve("r64").path
    with pytest.raises(AdapterTooLarge, match=r"needs \d+ pages of the pool; the pool has 64"):
        small.add_adapter("big", big)
    store = tmp_path / "store"
    assert small.list_adapters() == [] and not (store / "refs" / "big.json").exists()
    assert [os.listdir(store / d) for d in ("refs", "versions", "staging")] == [[], [], []]
    small.add_adapter("fits", engine.adapters.resolve("r1").path)
    assert [a.adapter_id for a in small.list_adapters()] == ["fits"]
