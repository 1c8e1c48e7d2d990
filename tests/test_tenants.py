"""Tenants without a model: the keys file, key lookup, namespaces, and the per-tenant limits."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pytest

from adapter_store.tenancy import is_valid_stored_id, qualify, split, tenant_of
from server.api.quotas import RequestGate, StorageQuota
from server.api.tenants import ANONYMOUS, Keyring, KeysFileError, Principal, TenantLimits
from server.errors import InvalidRequest, QuotaExceeded, TooManyRequests

KEYS = {
    "admin_keys": ["sk-root"],
    "inference_keys": ["sk-ops"],
    "default_limits": {"max_concurrent_requests": 4},
    "tenants": {
        "acme": {"inference_keys": ["sk-acme"], "admin_keys": ["sk-acme-admin"],
                 "limits": {"max_adapters": 2, "max_adapter_bytes": "1KiB"}},
        "globex": {"inference_keys": ["sha256:" + hashlib.sha256(b"sk-globex").hexdigest()]},
    },
}


def keyring(tmp_path, spec=KEYS, api_key=None, admin_key=None) -> Keyring:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(spec))
    return Keyring.build(path, api_key, admin_key)


def test_lookup_finds_each_role_and_tenant(tmp_path):
    ring = keyring(tmp_path)
    assert ring.lookup("sk-root") == Principal("admin", None)
    assert ring.lookup("sk-ops") == Principal("inference", None)
    acme = ring.lookup("sk-acme")
    assert (acme.role, acme.tenant) == ("inference", "acme")
    assert acme.limits == TenantLimits(max_adapters=2, max_adapter_bytes=1024, max_concurrent_requests=4)
    assert ring.lookup("sk-acme-admin").is_admin and ring.lookup("sk-acme-admin").tenant == "acme"
    globex = ring.lookup("sk-globex")  # listed only as its sha256
    assert (globex.role, globex.tenant, globex.limits.max_adapters) == ("inference", "globex", None)
    for wrong in ("", "sk-acm", "sk-acme ", "SK-ACME", "sha256:" + hashlib.sha256(b"sk-globex").hexdigest()):
        assert ring.lookup(wrong) is None
    assert ring.tenants == ["acme", "globex"]


def test_single_keys_without_a_file():
    assert not Keyring.build(None, None, None).enabled
    alone = Keyring.build(None, "sk-a", None)
    assert alone.lookup("sk-a") == Principal("admin", None)  # no admin key: the api key manages adapters
    both = Keyring.build(None, "sk-a", "sk-b")
    assert both.lookup("sk-a") == Principal("inference", None)
    assert both.lookup("sk-b") == Principal("admin", None)


@pytest.mark.parametrize(("spec", "words"), [
    ({"tenants": {"Bad Name": {}}}, ["tenants", "Bad Name"]),
    ({"tenants": {"acme": {"inference_keys": ["k1"], "admin_keys": ["k1"]}}}, ["twice"]),
    ({"tenants": {"acme": {"limits": {"max_adapters": -1}}}}, ["max_adapters"]),
    ({"tenants": {"acme": {"limits": {"max_concurrent_requests": 0}}}}, ["max_concurrent_requests"]),
    ({"tenants": {"acme": {"inference_keys": ["sha256:abc"]}}}, ["64 hex digits"]),
    ({"tenants": {"acme": {"inference_keys": [""]}}}, ["empty key"]),
    ({"tenant": {}}, ["tenant", "Extra inputs"]),
    ({"admin_keys": "sk-root"}, ["admin_keys"]),
])
def test_bad_keys_files_are_refused_naming_the_field(tmp_path, spec, words):
    with pytest.raises(KeysFileError) as info:
        keyring(tmp_path, spec)
    for word in words:
        assert word in str(info.value)


def test_unreadable_keys_file(tmp_path):
    with pytest.raises(KeysFileError, match="keys.json"):
        Keyring.build(tmp_path / "keys.json", None, None)
    (tmp_path / "keys.json").write_text("{not json")
    with pytest.raises(KeysFileError, match="keys.json"):
        Keyring.build(tmp_path / "keys.json", None, None)


def test_namespaces():
    assert qualify("acme", "bot") == "acme:bot" and qualify(None, "bot") == "bot"
    assert split("acme:bot") == ("acme", "bot") and split("bot") == (None, "bot")
    assert tenant_of("acme:bot") == "acme" and tenant_of("bot") is None
    for good in ("bot", "acme:bot", "a-1:x.y_z"):
        assert is_valid_stored_id(good)
    for bad in ("", ":bot", "acme:", "Acme:bot", "a:b:c", "../x", "a/b", "acme:../x", "x" * 129, ".x"):
        assert not is_valid_stored_id(bad), bad


def test_principal_sees_only_its_tenant():
    acme = Principal("inference", "acme")
    assert acme.qualify("bot") == "acme:bot"
    assert acme.qualify("globex:bot") is None and acme.qualify("../x") is None
    assert acme.sees("acme:bot") and not acme.sees("globex:bot") and not acme.sees("bot")
    assert acme.display("acme:bot") == "bot"
    with pytest.raises(InvalidRequest) as info:
        acme.stored_id("globex:bot")
    assert info.value.param == "adapter_id"
    assert ANONYMOUS.qualify("globex:bot") == "globex:bot" and ANONYMOUS.sees("globex:bot")
    assert ANONYMOUS.display("globex:bot") == "globex:bot" and ANONYMOUS.is_admin


def test_request_gate_bounds_each_tenant_separately():
    gate = RequestGate()
    acme = Principal("inference", "acme", TenantLimits(max_concurrent_requests=2))
    globex = Principal("inference", "globex", TenantLimits(max_concurrent_requests=1))
    first, second = gate.enter(acme), gate.enter(acme)
    with pytest.raises(TooManyRequests) as info:
        gate.enter(acme)
    assert info.value.status == 429 and info.value.retry_after == 1
    assert "max_concurrent_requests" in str(info.value)
    release_globex = gate.enter(globex)  # another tenant is not affected
    assert gate.in_flight() == {"acme": 2, "globex": 1}
    first()
    first()  # releasing twice gives back one slot only
    assert gate.in_flight()["acme"] == 1
    gate.enter(acme)
    second()
    release_globex()
    assert gate.in_flight() == {"acme": 1, "globex": 0}
    for _ in range(10):  # global keys have no limit and are not counted
        gate.enter(ANONYMOUS)


@dataclass
class Stored:
    adapter_id: str
    size_bytes: int


def test_storage_quota_counts_adapters_and_bytes():
    quota = StorageQuota()
    acme = Principal("admin", "acme", TenantLimits(max_adapters=2, max_adapter_bytes=1000))
    stored = [Stored("acme:a", 600), Stored("globex:b", 10_000), Stored("c", 10_000)]
    with quota.reserve(acme, "acme:new", 400, lambda: stored):
        pass
    with pytest.raises(QuotaExceeded) as info:
        with quota.reserve(acme, "acme:new", 401, lambda: stored):
            pass
    assert info.value.status == 429 and info.value.param == "file"
    assert "max_adapter_bytes" in info.value.message
    with quota.reserve(acme, "acme:a", 1000, lambda: stored):  # a replacement counts only its growth
        pass
    two = [*stored, Stored("acme:b", 1)]
    with pytest.raises(QuotaExceeded, match="max_adapters"):
        with quota.reserve(acme, "acme:c", 1, lambda: two):
            pass


def test_storage_quota_holds_concurrent_uploads():
    quota = StorageQuota()
    acme = Principal("admin", "acme", TenantLimits(max_adapters=1))
    with quota.reserve(acme, "acme:a", 10, list):
        with pytest.raises(QuotaExceeded):  # the first upload is still being stored
            with quota.reserve(acme, "acme:b", 10, list):
                pass
    with quota.reserve(acme, "acme:b", 10, list):  # released once the first one is done
        pass
