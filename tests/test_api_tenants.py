"""Tenants over real HTTP: separate namespaces, another tenant's adapter answered exactly like a missing
one, filtered listings, roles, storage quotas and concurrency limits, and the tenant metrics label."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api_helpers import BASE, metric, metrics, upload, wait_until, write_adapter
from tests.store_helpers import stored_files as snapshot

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"
ROOT, ACME, ACME_ADMIN = "sk-root", "sk-acme", "sk-acme-admin"
GLOBEX, GLOBEX_ADMIN = "sk-globex", "sk-globex-admin"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenant_adapters")
    return {name: write_adapter(root / name, rank=rank, modules=("v_proj",), seed=seed)
            for name, rank, seed in (("a", 8, 1), ("b", 8, 2), ("big", 16, 3))}


@pytest.fixture(scope="module")
def server(api_server_factory, adapters, tmp_path_factory):
    size = sum(f.stat().st_size for f in adapters["a"].iterdir())
    keys = {
        "admin_keys": [ROOT],
        "tenants": {
            "acme": {"inference_keys": [ACME], "admin_keys": [ACME_ADMIN],
                     "limits": {"max_adapters": 2, "max_adapter_bytes": int(2.5 * size),
                                "max_concurrent_requests": 2}},
            "globex": {"inference_keys": [GLOBEX], "admin_keys": [GLOBEX_ADMIN]},
        },
    }
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(keys))
    s = api_server_factory("--pool-bytes", "64MiB", "--max-num-seqs", "4", "--keys-file", str(path))
    for key, adapter_id, src in ((ACME_ADMIN, "bot", "a"), (GLOBEX_ADMIN, "bot", "b"),
                                 (ACME_ADMIN, "acme-only", "a")):
        r = upload(s.url, adapter_id, adapters[src], headers=auth(key))
        assert r.status_code == 201, r.text
    s.store_dir = s.log_path.parent / "adapters"
    yield s
    s.stop()  # its memory and CPU go back to the rest of the suite


def complete(url: str, key: str, **fields) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **fields}
    return httpx.post(f"{url}/v1/completions", json=body, headers=auth(key), timeout=120)


def test_same_name_in_two_tenants_is_two_adapters(server):
    acme = complete(server.url, ACME, model="bot")
    globex = complete(server.url, GLOBEX, model="bot")
    assert acme.status_code == globex.status_code == 200
    assert acme.json()["model"] == "bot" and globex.json()["model"] == "bot"
    texts = {k: r.json()["choices"][0]["text"] for k, r in (("acme", acme), ("globex", globex))}
    assert texts["acme"] != texts["globex"]
    # A global key names them tenant:name and gets the same texts.
    for tenant in ("acme", "globex"):
        r = complete(server.url, ROOT, adapter_id=f"{tenant}:bot")
        assert r.json()["choices"][0]["text"] == texts[tenant] and r.json()["model"] == f"{tenant}:bot"


def test_another_tenants_adapter_is_exactly_like_a_missing_one(server):
    """Same status, same body but for the name asked for: no hint that acme-only exists."""
    for field in ("model", "adapter_id"):
        hidden = complete(server.url, GLOBEX, **{field: "acme-only"})
        missing = complete(server.url, GLOBEX, **{field: "never-existed"})
        assert hidden.status_code == missing.status_code == 404
        assert hidden.text.replace("acme-only", "X") == missing.text.replace("never-existed", "X")
        assert hidden.headers.get("content-length") is not None
        assert len(hidden.content) - len("acme-only") == len(missing.content) - len("never-existed")
    for method, key in (("GET", GLOBEX), ("DELETE", GLOBEX_ADMIN)):
        hidden = httpx.request(method, f"{server.url}/v1/adapters/acme-only", headers=auth(key))
        missing = httpx.request(method, f"{server.url}/v1/adapters/never-existed", headers=auth(key))
        assert hidden.status_code == missing.status_code == 404
        assert hidden.text.replace("acme-only", "X") == missing.text.replace("never-existed", "X")
    assert complete(server.url, ACME, model="acme-only").status_code == 200  # still there for its owner


def test_listings_show_only_the_callers_adapters(server):
    def ids(key: str, path: str) -> list[str]:
        return [m["id"] for m in httpx.get(f"{server.url}{path}", headers=auth(key)).json()["data"]]

    assert ids(ACME, "/v1/adapters") == ["acme-only", "bot"]
    assert ids(GLOBEX, "/v1/adapters") == ["bot"]
    assert ids(ACME, "/v1/models") == [BASE, "acme-only", "bot"]
    assert ids(GLOBEX, "/v1/models") == [BASE, "bot"]
    assert set(ids(ROOT, "/v1/adapters")) >= {"acme:acme-only", "acme:bot", "globex:bot"}
    card = httpx.get(f"{server.url}/v1/adapters/bot", headers=auth(ACME)).json()
    assert card["id"] == "bot" and card["tenant"] == "acme"


def test_keys_and_roles(server, adapters):
    assert complete(server.url, "sk-nobody").status_code == 401
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT}).status_code == 401
    r = upload(server.url, "x", adapters["a"], headers=auth(ACME))  # an inference key may not upload
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert httpx.delete(f"{server.url}/v1/adapters/bot", headers=auth(ACME)).status_code == 403
    # A tenant key can't reach out of its namespace, even naming the tenant.
    for name in ("globex:bot", "acme:bot"):
        assert complete(server.url, ACME, adapter_id=name).status_code == 400
    assert complete(server.url, ACME_ADMIN, model="bot").status_code == 200  # admin includes inference
    # The global admin may act for a tenant.
    assert upload(server.url, "globex:by-root", adapters["a"], headers=auth(ROOT)).status_code == 201
    assert [m["id"] for m in httpx.get(f"{server.url}/v1/adapters", headers=auth(GLOBEX)).json()["data"]] == [
        "bot", "by-root"]
    assert httpx.delete(f"{server.url}/v1/adapters/globex:by-root", headers=auth(ROOT)).status_code == 200



def test_storage_quota(server, adapters):
    before = snapshot(server.store_dir)
    r = upload(server.url, "third", adapters["a"], headers=auth(ACME_ADMIN))  # max_adapters is 2
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert "max_adapters" in r.json()["error"]["message"] and "Retry-After" not in r.headers
    r = upload(server.url, "bot", adapters["big"], replace=True, headers=auth(ACME_ADMIN))  # bytes
    assert r.status_code == 429 and "max_adapter_bytes" in r.json()["error"]["message"]
    assert snapshot(server.store_dir) == before
    r = upload(server.url, "bot", adapters["a"], replace=True, headers=auth(ACME_ADMIN))  # same size: fine
    assert r.status_code == 201
    # globex has no quota
    assert upload(server.url, "third", adapters["a"], headers=auth(GLOBEX_ADMIN)).status_code == 201


def test_concurrent_request_limit(server):
    body = {"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as client:
        streams = [client.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth(ACME))
                   for _ in range(2)]
        responses = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in responses] == [200, 200]
            lines = [r.iter_lines() for r in responses]
            for it in lines:
                next(it)  # both are running
            assert metric(server.url, "lora_server_tenant_requests_in_flight", tenant="acme") == 2
            third = complete(server.url, ACME, max_tokens=2)
            assert third.status_code == 429 and int(third.headers["Retry-After"]) >= 1
            assert third.json()["error"]["code"] == "rate_limit_exceeded"
            assert "max_concurrent_requests" in third.json()["error"]["message"]
            assert complete(server.url, GLOBEX, max_tokens=2).status_code == 200  # other tenants unaffected
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    assert wait_until(lambda: metric(server.url, "lora_server_tenant_requests_in_flight", tenant="acme") == 0)
    assert complete(server.url, ACME, max_tokens=2).status_code == 200


def test_metrics_carry_the_tenant(server):
    complete(server.url, ACME, model="bot", max_tokens=2)
    complete(server.url, GLOBEX, model="bot", max_tokens=2)
    complete(server.url, ACME, max_tokens=2)
    samples = metrics(server.url)

    def value(name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())

    for tenant in ("acme", "globex"):
        assert value("lora_server_requests_total", tenant=tenant, adapter="bot", status="200") >= 1
        assert value("lora_server_generation_tokens_total", tenant=tenant, adapter="bot") >= 2
        assert value("lora_server_time_to_first_token_seconds_count", tenant=tenant, adapter="bot") >= 1
    assert value("lora_server_requests_total", tenant="acme", adapter=BASE, status="200") >= 1
    assert value("lora_server_requests_total", tenant="globex", adapter=BASE, status="429") == 0
    assert value("lora_server_requests_total", tenant="acme", status="429") >= 1
