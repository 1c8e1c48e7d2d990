"""The real default model (SmolLM2-135M-Instruct, GGUF) against transformers loading the same file."""


import pytest
import torch

from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams
from tests.engine_helpers import engine_logits, hf_greedy, run_all

pytestmark = pytest.mark.slow

TEXTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village nestled between two mountains, there lived an old "
    "clockmaker who had spent his whole life building clocks that never told the right time. "
    "One winter morning a stranger knocked at his door and asked",
]


@pytest.fixture(scope="module")
def hf_model(smollm2_hf_model):
    return smollm2_hf_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return LLMEngine(EngineConfig(model=None, dtype="float32", pool_bytes=64 * 2**20,
                                  max_num_batched_tokens=64, adapter_store_dir=str(store)))


def test_greedy_tokens_match_transformers_in_shared_batches(engine, hf_model):
    prompts = {f"p{i}": engine.tokenizer.encode(t) for i, t in enumerate(TEXTS)}
    got = run_all(engine, prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for rid, prompt in prompts.items():
        want, _ = hf_greedy(hf_model, prompt, 32)
        assert got[rid] == want, (rid, engine.tokenizer.decode(got[rid]), engine.tokenizer.decode(want))
    assert engine.pool.num_free == engine.pool.num_pages


def test_last_position_logits_close(engine, hf_model):
    for text in TEXTS[:3]:
        prompt = engine.tokenizer.encode(text)
        ours = engine_logits(engine, prompt)
        with torch.no_grad():
            theirs = hf_model(torch.tensor([prompt])).logits[0, -1].float()
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)


def test_chat_template_and_text_output(engine):
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    engine.add_request(ids, SamplingParams(max_tokens=24, temperature=0), request_id="chat")
    text, reason = "", None
    while engine.has_work():
        for out in engine.step():
            text += out.new_text
            reason = out.finish_reason
    assert "4" in text
    assert reason in ("stop", "length")
