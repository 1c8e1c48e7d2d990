"""AsyncEngine: the step loop on a thread, streams per request, abort by closing the stream."""

import asyncio
import contextlib

import pytest

from server.async_engine import AsyncEngine
from server.config import EngineConfig
from server.errors import ContextLengthExceeded, Overloaded, UnknownAdapter
from server.sampling_params import SamplingParams
from tests.engine_helpers import hf_greedy, tiny_llama_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("async")
    _, model = tiny_llama_dir(tmp / "model", smollm2_tokenizer_dir, seed=1, num_hidden_layers=2,
                              max_position_embeddings=128)
    return tmp, model


def _engine(tmp, **kw) -> AsyncEngine:
    engine = AsyncEngine(EngineConfig(model=str(tmp / "model"), pool_bytes=2 * 2**20,
                                      adapter_store_dir=str(tmp / "store"), **kw))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    engine = _engine(tiny_dir[0])
    yield engine, tiny_dir[1]
    engine.shutdown(drain=False)


async def _collect(engine, prompt, params, **kw):
    return [out async for out in engine.generate(prompt, params, **kw)]


def test_concurrent_streams_match_transformers(tiny):
    engine, model = tiny
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3], [50, 60], list(range(100, 130))]

    async def main():
        return await asyncio.gather(*(_collect(engine, p, params) for p in prompts))

    results = asyncio.run(main())
    for prompt, outs in zip(prompts, results, strict=True):
        assert [t for o in outs for t in o.new_token_ids] == hf_greedy(model, prompt, 10)[0]
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert all(not o.finished for o in outs[:-1])
        assert outs[-1].num_prompt_tokens == len(prompt) and outs[-1].num_output_tokens == 10


def test_closing_the_stream_aborts_and_frees_pages(tiny):
    engine, _ = tiny

    async def main():
        params = SamplingParams(max_tokens=100, ignore_eos=True)
        stream = engine.generate([1, 2, 3], params, request_id="gone")
        await stream.__anext__()
        await stream.aclose()  # the client went away
        for _ in range(200):
            if engine.stats().pool_pages_free == engine.stats().pool_pages_total:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())
    assert engine.stats().num_running == 0


def test_errors_raise_before_streaming(tiny):
    engine, _ = tiny

    async def first(**kw):
        return await engine.generate([1, 2], SamplingParams(max_tokens=4), **kw).__anext__()

    with pytest.raises(UnknownAdapter):
        asyncio.run(first(adapter_id="nope"))
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 128"):
        asyncio.run(engine.generate([1] * 100, SamplingParams(max_tokens=40)).__anext__())


def test_full_queue_is_refused_with_retry_after(tiny_dir):
    engine = _engine(tiny_dir[0], max_num_seqs=1, max_waiting=1)
    params = SamplingParams(max_tokens=100, ignore_eos=True)

    async def main():
        running = engine.generate([1, 2], params)
        await running.__anext__()  # admitted: the only sequence slot is taken
        queued = engine.generate([3, 4], params)
        task = asyncio.ensure_future(queued.__anext__())
        await asyncio.sleep(0.05)
        try:
            with pytest.raises(Overloaded) as err:
                await engine.generate([5], params).__anext__()
            return err.value
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await queued.aclose()
            await running.aclose()

    try:
        err = asyncio.run(main())
        assert err.status == 503 and err.retry_after >= 1 and "1 requests are waiting" in err.message
    finally:
        engine.shutdown(drain=False)
