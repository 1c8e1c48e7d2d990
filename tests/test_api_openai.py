"""The OpenAI-compatible API over real HTTP against the real SmolLM2 server (``api_server``).

Greedy decoding makes outputs deterministic, so streaming and non-streaming must agree exactly.
"""

from __future__ import annotations

import time

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

BASE = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(api_server) -> OpenAI:
    return OpenAI(base_url=f"{api_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of /metrics, e.g. ``metric(url, "lora_server_pool_pages", kind="kv")``."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_health_ready_and_models(api_server, client):
    assert httpx.get(f"{api_server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{api_server.url}/ready").status_code == 200
    models = client.models.list().data
    assert models[0].id == BASE
    assert all(m.parent == BASE for m in models[1:])


def test_completion_greedy(client):
    out = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=6, temperature=0)
    assert out.object == "text_completion" and out.model == BASE
    assert len(out.choices) == 1 and out.choices[0].text
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens > 0 and 0 < out.usage.completion_tokens <= 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_prompt_forms_and_n(client):
    text = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    ids = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0)
    assert ids.choices[0].logprobs.tokens  # token strings of the one generated token
    out = client.completions.create(model=BASE, prompt=[PROMPT, "Once upon a time"], n=2, max_tokens=4,
                                    temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text == text  # greedy: the n choices agree
    assert out.choices[2].text == out.choices[3].text
    tokenized = client.completions.create(model=BASE, prompt=[[504, 3575, 282, 4649, 314]], max_tokens=4,
                                          temperature=0)
    assert tokenized.usage.prompt_tokens == 5


def test_completion_stream_matches_non_stream(client):
    full = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model=BASE, prompt=PROMPT, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_and_chat_stream(client):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    full = client.chat.completions.create(model=BASE, messages=messages, max_tokens=6, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content
    stream = client.chat.completions.create(model=BASE, messages=messages, max_tokens=6, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_raw_sse_ends_with_done(api_server):
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{api_server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_bad_parameter_is_400_naming_the_field(api_server, client):
    with pytest.raises(BadRequestError) as err:
        client.completions.create(model=BASE, prompt=PROMPT, max_tokens=2, temperature=5)
    assert err.value.status_code == 400
    assert err.value.body["param"] == "temperature" and "temperature" in err.value.body["message"]
    r = httpx.post(f"{api_server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": "many"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_tokens" and "max_tokens" in r.json()["error"]["message"]
    bad_role = {"messages": [{"role": "wizard", "content": "x"}], "max_tokens": 2}
    r = httpx.post(f"{api_server.url}/v1/chat/completions", json=bad_role)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_context_length_is_400(client):
    with pytest.raises(BadRequestError) as err:
        client.completions.create(model=BASE, prompt=PROMPT, max_tokens=10_000)
    assert err.value.body["code"] == "context_length_exceeded"
    assert "context length" in err.value.body["message"] and "10000" in err.value.body["message"]


def test_unknown_adapter_is_404_never_base(client):
    with pytest.raises(NotFoundError) as err:
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    assert "no-such-adapter" in err.value.body["message"] and err.value.body["param"] == "model"
    with pytest.raises(NotFoundError) as err:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"adapter_id": "no-such-adapter"})
    assert "no-such-adapter" in err.value.body["message"] and err.value.body["param"] == "adapter_id"


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_pages(api_server, stream):
    url = api_server.url
    assert _wait_for(lambda: metric(url, "lora_server_pool_pages", kind="kv") == 0)
    body = {"prompt": PROMPT * 20, "max_tokens": 600, "ignore_eos": True, "temperature": 0, "stream": stream}
    with httpx.Client(timeout=60) as http:
        if stream:
            with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()  # keep a reference: a dropped iterator closes the connection
                next(lines)  # the request is running: its first chunk arrived
                assert metric(url, "lora_server_pool_pages", kind="kv") > 0
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(f"{url}/v1/completions", json=body, timeout=2.0)
    # The connection is closed: the engine must abort the request and free its KV pages at once.
    assert _wait_for(lambda: metric(url, "lora_server_pool_pages", kind="kv") == 0, timeout=10)
    assert metric(url, "lora_server_num_requests_running") == 0
    assert metric(url, "lora_server_requests_total", endpoint="completions", adapter=BASE, status="499") >= 1


def test_metrics(api_server, client):
    client.completions.create(model=BASE, prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(f"{api_server.url}/metrics").text
    for name in ("lora_server_requests_total", "lora_server_prompt_tokens_total",
                 "lora_server_generation_tokens_total", "lora_server_time_to_first_token_seconds_bucket",
                 "lora_server_inter_token_latency_seconds_bucket", "lora_server_num_requests_waiting",
                 "lora_server_adapters", "lora_server_adapter_loads_total", "lora_server_host_cache_bytes",
                 "lora_server_pool_pages", "lora_requests_info"):
        assert f"\n{name}" in text, name
    info = next(f for f in text_string_to_metric_families(text) if f.name == "lora_requests_info").samples[0]
    assert set(info.labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert metric(api_server.url, "lora_server_requests_total", endpoint="completions", adapter=BASE,
                  status="200") >= 1
    assert metric(api_server.url, "lora_server_time_to_first_token_seconds_count", adapter=BASE) >= 1
    assert metric(api_server.url, "lora_server_inter_token_latency_seconds_count", adapter=BASE) >= 1


def test_openapi_lists_every_route(api_server):
    doc = httpx.get(f"{api_server.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.") and doc["info"]["title"]
    expected = {
        "/v1/completions": {"post"}, "/v1/chat/completions": {"post"}, "/v1/models": {"get"},
        "/v1/adapters": {"get", "post"}, "/v1/adapters/{adapter_id}": {"get", "delete"},
        "/health": {"get"}, "/ready": {"get"}, "/metrics": {"get"},
    }
    for path, methods in expected.items():
        assert methods <= set(doc["paths"][path]), path
    upload = doc["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"adapter_id", "adapter_config.json", "adapter_model.safetensors"} <= set(
        upload["schema"]["properties"])


def test_prefix_cache_metrics(api_server, client):
    url = api_server.url
    prompt = "You are a terse assistant who answers in one word. " * 4  # > 2 KV blocks of tokens
    queries = metric(url, "vllm:prefix_cache_queries_total")
    hits = metric(url, "vllm:prefix_cache_hits_total")
    first = client.completions.create(model=BASE, prompt=prompt + "Sky?", max_tokens=4, temperature=0)
    again = client.completions.create(model=BASE, prompt=prompt + "Sky?", max_tokens=4, temperature=0)
    assert again.choices[0].text == first.choices[0].text
    asked = 2 * first.usage.prompt_tokens
    assert metric(url, "vllm:prefix_cache_queries_total") - queries == asked
    found = metric(url, "vllm:prefix_cache_hits_total") - hits
    assert 32 <= found < first.usage.prompt_tokens  # the second request read whole blocks, not its last token
    assert metric(url, "lora_server_prefix_cache_blocks", state="evictable") >= 2
    assert metric(url, "lora_server_pool_pages", kind="cached") > 0
    assert metric(url, "lora_server_evictions_total", kind="kv_block") >= 0
