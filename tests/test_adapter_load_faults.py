"""Failed adapter loads, without HTTP: corrupted store files are refused (never served), a failed
load is retried after its backoff and heals, an adapter too large for this server fails its requests
with a clear error instead of being re-read forever, and a weight read that fails on the engine
thread ends only that adapter's requests while the rest of the step runs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from adapter_store.integrity import IntegrityError, verify_version
from adapter_store.store import AdapterStore
from server.adapters import AdapterManager, AdapterRef
from server.config import EngineConfig
from server.engine import LLMEngine
from server.errors import AdapterCorrupt, AdapterTooLarge, AdapterTooLargeHere, AdapterUnavailable
from server.page_layout import PageLayout
from server.sampling_params import SamplingParams
from tests.api_helpers import wait_until
from tests.engine_helpers import run_all, tiny_llama_dir
from tests.peft_helpers import build_adapters
from tests.store_helpers import weights_file

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def v1(make_peft_adapter) -> Path:
    return make_peft_adapter("v1", r=8, target_modules=["q_proj", "v_proj"])[0]


@pytest.fixture
def manager(tmp_path, tiny_model_config, tiny_base_weights):
    made = []

    def make(host_cache_bytes: int = 2**30, clock=time.monotonic) -> AdapterManager:
        layout = PageLayout.for_model(tiny_model_config)
        m = AdapterManager(AdapterStore(tmp_path / "store"), tiny_model_config, layout, 4096,
                           host_cache_bytes, 256, torch.float32, tiny_base_weights, clock=clock)
        made.append(m)
        return m

    yield make
    for m in made:
        m.shutdown()


def load(m: AdapterManager, uid: int) -> AdapterUnavailable | None:
    """Ask for the adapter until it is in host memory (None) or its load failed (the error), and
    the loader is done with it."""
    assert wait_until(lambda: (m.spec_if_ready(uid) is not None or m.failed(uid) is not None)
                      and uid not in m._loading, timeout=60)
    return m.failed(uid)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor: the file still parses, the weights are wrong
    path.write_bytes(bytes(data))


def test_verify_version_names_what_is_wrong(tmp_path, v1):
    store = AdapterStore(tmp_path / "store")
    version = store.version_path(store.put("a", v1).version)
    assert set(verify_version(version)) >= {"adapter_config.json", "adapter_model.safetensors"}
    config = version / "adapter_config.json"
    good = config.read_bytes()
    config.write_text(json.dumps({**json.loads(good), "lora_alpha": 1}))  # parses, serves wrong
    with pytest.raises(IntegrityError, match="adapter_config.json"):
        verify_version(version)
    config.write_bytes(good)
    (version / "manifest.json").write_bytes((version / "manifest.json").read_bytes() + b" ")
    with pytest.raises(IntegrityError, match="does not match the version name"):
        verify_version(version)


def test_a_corrupted_file_is_refused_and_a_reupload_of_good_bytes_repairs_it(manager, v1):
    clock = Clock()
    m = manager(host_cache_bytes=2**30, clock=clock)
    m.add("a", v1)
    m.add("twin", v1)  # same content: the same version directory
    a, twin = m.acquire("a"), m.acquire("twin")
    m.host.clear()
    flip_last_byte(weights_file(m.store.root, "a"))
    error = load(m, a.uid)
    assert isinstance(error, AdapterCorrupt) and error.code == "adapter_corrupt" and error.status == 503
    assert "'a'" in error.message and "/" not in error.message
    assert isinstance(load(m, twin.uid), AdapterCorrupt)
    assert m.load_failures.snapshot()["corrupt"] == 2
    assert a.uid not in m.host
    assert not m.store.verify("a")

    m.add("a", v1, replace=True)  # the same good bytes again
    assert m.store.verify("a")
    fresh = m.acquire("a")
    m.host.clear()
    assert load(m, fresh.uid) is None
    # The other id naming the same version heals too, at its first try after the backoff.
    assert m.spec_if_ready(twin.uid) is None and isinstance(m.failed(twin.uid), AdapterCorrupt)
    clock.now += error.retry_after
    assert load(m, twin.uid) is None


def cold_adapter(manager, v1) -> tuple[AdapterManager, Clock, AdapterRef, Path]:
    """A manager on a fake clock with adapter "a" stored, acquired and dropped from host memory."""
    clock = Clock()
    m = manager(clock=clock)
    m.add("a", v1)
    ref = m.acquire("a")
    m.host.clear()
    return m, clock, ref, weights_file(m.store.root, "a")


def test_a_failed_load_is_retried_after_its_backoff(manager, v1):
    m, clock, ref, path = cold_adapter(manager, v1)
    data = path.read_bytes()
    path.unlink()
    assert type(load(m, ref.uid)) is AdapterUnavailable
    for _ in range(5):  # within the backoff: no new read is started
        assert m.spec_if_ready(ref.uid) is None and ref.uid not in m._loading
    path.write_bytes(data)  # the file is back (a remount, a restore)
    assert m.failed(ref.uid) is not None
    clock.now += 1.0
    assert m.failed(ref.uid) is None
    assert load(m, ref.uid) is None
    assert m.load_failures.snapshot()["missing"] == 1
    assert ref.failure is None


def test_backoff_doubles_on_repeated_failures(manager, v1):
    m, clock, ref, path = cold_adapter(manager, v1)
    path.unlink()
    waits = []
    for _ in range(4):
        error = load(m, ref.uid)
        waits.append(ref.failure.retry_at - clock.now)
        assert error.retry_after == math.ceil(waits[-1])
        clock.now = ref.failure.retry_at
    assert waits == [1.0, 2.0, 4.0, 8.0]
    assert m.load_failures.snapshot()["missing"] == 4


def test_an_adapter_larger_than_the_host_cache_is_refused_not_reread_forever(manager, tmp_path, v1):
    big = manager()  # a replica with a larger host cache stored it
    big.add("a", v1)
    small = manager(host_cache_bytes=4096)
    with pytest.raises(AdapterTooLarge, match="host_cache_bytes"):
        small.add("b", v1)
    ref = small.acquire("a")
    error = load(small, ref.uid)
    assert isinstance(error, AdapterTooLargeHere) and error.code == "adapter_too_large"
    assert "host_cache_bytes (4096)" in error.message
    for _ in range(5):  # never retried: the server's size won't change
        assert small.spec_if_ready(ref.uid) is None and ref.uid not in small._loading
    assert small.load_failures.snapshot()["too_large"] == 1


# ---- the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("load_faults")
    model_dir, base = tiny_llama_dir(tmp / "model", smollm2_tokenizer_dir)
    configs = {name: LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
               for name in ("good", "flaky")}
    _, paths = build_adapters(base, configs, tmp / "adapters", std=0.3)
    return model_dir, paths, tmp


def make_engine(tiny, name: str, host_cache_bytes: int = 2**30) -> LLMEngine:
    model_dir, _, tmp = tiny
    return LLMEngine(EngineConfig(model=str(model_dir), pool_bytes=8 * 2**20, max_num_batched_tokens=64,
                                  adapter_store_dir=str(tmp / name), host_cache_bytes=host_cache_bytes))


def run_until_done(engine: LLMEngine, timeout: float = 120) -> dict[str, list]:
    """Step until no work is left; outputs by request id. ``timeout`` bounds a hang (the livelock
    this file guards against), it measures nothing."""
    outs: dict[str, list] = {}
    deadline = time.monotonic() + timeout
    while engine.has_work():
        assert time.monotonic() < deadline, "requests never finished"
        step = engine.step()
        for out in step:
            outs.setdefault(out.request_id, []).append(out)
        if not step:
            time.sleep(0.005)  # waiting for the loader thread
    return outs


def test_engine_fails_requests_on_an_adapter_too_large_for_its_host_cache(tiny):
    _, paths, _ = tiny
    make_engine(tiny, "store_big").add_adapter("good", paths["good"])
    engine = make_engine(tiny, "store_big", host_cache_bytes=4096)  # restarted with a smaller cache
    engine.add_request([5, 9, 3], GREEDY, "good", request_id="r")
    engine.add_request([5, 9, 3], GREEDY, None, request_id="base")
    outs = run_until_done(engine)
    assert isinstance(outs["r"][-1].error, AdapterTooLargeHere)
    assert len(outs["base"]) == GREEDY.max_tokens and outs["base"][-1].error is None
    with pytest.raises(AdapterTooLargeHere):  # later requests fail at once, nothing is re-read
        engine.add_request([5, 9, 3], GREEDY, "good")
    assert engine.stats().adapter_load_failures["too_large"] == 1


def test_a_weight_read_failing_on_the_engine_thread_fails_only_that_adapter(tiny, monkeypatch):
    """The host cache dropped the adapter between scheduling and the copy into pages, and the disk
    read then fails: that adapter's requests end with 503, the others of the same step run."""
    _, paths, _ = tiny
    engine = make_engine(tiny, "store_sync_read")
    for name in ("good", "flaky"):
        engine.add_adapter(name, paths[name])
    prompts = {"g": [5, 9, 3], "b": [7, 7, 8, 9, 100], "f": [5, 9, 3]}
    want = run_all(engine, {k: prompts[k] for k in "gb"}, GREEDY, {"g": "good"})
    flaky = engine.adapters.resolve("flaky")
    original = engine.adapters.spec_if_ready

    def spec_then_lose(uid: int):
        spec = original(uid)
        if uid == flaky.uid and spec is not None:
            engine.adapters.host.pop(uid)
            weights_file(engine.adapters.store.root, "flaky").unlink()
        return spec

    monkeypatch.setattr(engine.adapters, "spec_if_ready", spec_then_lose)
    for rid, prompt in prompts.items():
        engine.add_request(prompt, GREEDY, {"g": "good", "f": "flaky"}.get(rid), request_id=rid)
    outs = run_until_done(engine)
    assert type(outs["f"][-1].error) is AdapterUnavailable and outs["f"][-1].finished
    for rid in "gb":
        assert [t for o in outs[rid] for t in o.new_token_ids] == want[rid]
    assert not engine.scheduler.residency.is_resident(flaky.uid)
    assert engine.pool.used("kv") == 0
    assert engine.stats().adapter_load_failures["missing"] == 1
