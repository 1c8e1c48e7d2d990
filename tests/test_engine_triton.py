"""The whole engine on the Triton kernels (attention and LoRA), forced under TRITON_INTERPRET=1 on CPU:
a tiny random Llama serving adapters of ranks 1 to 64 mixed with base requests, in steps that mix
chunked prefill with decode. Its greedy tokens must be those of the torch reference path.

fp32: tokens identical. bf16: the two paths round at different points (the Triton kernels keep
LoRA intermediates and attention scores in fp32 and round outputs once), so the check is the
reduced-precision one of tests/test_engine_bf16.py: identical until a first divergence, where each
side's token is among the other's top-5 alternatives.

What the interpreter cannot show (only a GPU run can): compiled-kernel numerics (tl.dot on bf16
operands is emulated through an fp32 upcast here, because the interpreter's bf16 dot is wrong; the
decode-shaped LoRA kernels use no tl.dot and run their real bf16 code), tf32/bf16 tensor-core
rounding, pinned-memory asynchronous copies, the side stream of adapter writes and its events.
"""

import pytest
from peft import LoraConfig

from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams
from tests.engine_helpers import tiny_llama_dir
from tests.peft_helpers import build_adapters

pytestmark = pytest.mark.slow

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "r1": LoraConfig(r=1, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
    "r8": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "r16": LoraConfig(r=16, lora_alpha=16, target_modules=ALL),
    "r64": LoraConfig(r=64, lora_alpha=32, target_modules=["q_proj", "k_proj", "gate_proj", "up_proj"]),
}
PROMPTS = {"a": [5, 9, 3], "b": list(range(10, 40)), "c": [200, 3], "d": [7, 7, 8, 9, 100],
           "base1": [11, 12, 13, 14], "base2": list(range(50, 71))}
ADAPTERS = {"a": "r1", "b": "r8", "c": "r16", "d": "r64", "base1": None, "base2": None}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, smollm2_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("triton_engine")
    model_dir, base = tiny_llama_dir(tmp / "model", smollm2_tokenizer_dir, num_hidden_layers=2)
    _, paths = build_adapters(base, CONFIGS, tmp / "adapters", std=0.3)
    return tmp, model_dir, paths


def _run(dirs, backend: str, dtype: str) -> dict[str, list]:
    tmp, model_dir, paths = dirs
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype=dtype, pool_bytes=2 * 2**20,
                                    max_num_batched_tokens=16, kernel_backend=backend, lora_backend=backend,
                                    adapter_store_dir=str(tmp / f"store-{backend}-{dtype}")))
    assert engine.runner.lora.name == backend
    for name, path in paths.items():
        engine.add_adapter(name, path)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=5)
    for rid, prompt in PROMPTS.items():
        engine.add_request(prompt, params, ADAPTERS[rid], request_id=rid)
    got: dict[str, list] = {rid: [] for rid in PROMPTS}
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].extend(out.logprobs)
    assert engine.pool.used("kv") == 0
    return got


def test_triton_engine_fp32_tokens_identical_to_torch_path(dirs):
    triton, torch_ref = _run(dirs, "triton", "float32"), _run(dirs, "torch", "float32")
    for rid in PROMPTS:
        assert [lp.token_id for lp in triton[rid]] == [lp.token_id for lp in torch_ref[rid]], rid
    assert len({tuple(lp.token_id for lp in v) for v in triton.values()}) == len(PROMPTS)  # outputs differ


def test_triton_engine_bf16_close_to_torch_path(dirs):
    triton, torch_ref = _run(dirs, "triton", "bfloat16"), _run(dirs, "torch", "bfloat16")
    for rid in PROMPTS:
        a, b = triton[rid], torch_ref[rid]
        assert len(a) == len(b) == 8
        assert a[0].token_id == b[0].token_id, rid
        for x, y in zip(a, b, strict=True):
            if x.token_id != y.token_id:
                assert x.token_id in dict(y.top) and y.token_id in dict(x.top), rid
                break
