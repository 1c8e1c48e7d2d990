"""The cold-load fast paths of adapter_store: a plain bf16 adapter's factors kept bf16 as views of the
bytes that were hashed, the version read once (hash and parse from one buffer), and the load plan
cached by the exact config and header bytes. Each test fails if its fast path is bypassed or wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_store import integrity
from adapter_store.integrity import IntegrityError, read_version
from adapter_store.peft_format import WEIGHTS_NAME, load_peft_adapter
from adapter_store.peft_plan import load_plan
from adapter_store.store import AdapterStore
from server.errors import AdapterIncompatible, InvalidAdapter

QV = {"r": 8, "target_modules": ["q_proj", "v_proj"]}


def _bytes(path: Path) -> bytearray:
    return bytearray((path / WEIGHTS_NAME).read_bytes())


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].a.float(), b[key].a.float())
        assert torch.equal(a[key].b.float(), b[key].b.float())
        assert (a[key].rank, a[key].scale) == (b[key].rank, b[key].scale)


def test_plain_bf16_factors_stay_bf16_as_views_of_the_bytes(make_peft_adapter, tiny_model_config):
    path, _ = make_peft_adapter(dtype=torch.bfloat16, **QV)
    data = _bytes(path)
    fp32 = load_peft_adapter(path, tiny_model_config)
    kept = load_peft_adapter(path, tiny_model_config, data=data, keep_bf16=True)
    _same(kept.weights, fp32.weights)
    base = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    for w in kept.weights.values():
        for t in (w.a, w.b):
            assert t.dtype == torch.bfloat16 and base <= t.data_ptr() < base + len(data)  # no copy
    assert kept.nbytes * 2 == fp32.nbytes
    assert kept.checksum == fp32.checksum and kept.source_dtype == torch.bfloat16


@pytest.mark.parametrize(("file_dtype", "extra"), [(torch.float32, {}), (torch.bfloat16, {"use_dora": True})])
def test_keep_bf16_only_for_plain_bf16_adapters(make_peft_adapter, tiny_model_config, file_dtype, extra):
    """An fp32 file, or a DoRA one (its scale is computed from A and B at load), is cast as before."""
    path, _ = make_peft_adapter(dtype=file_dtype, **QV, **extra)
    kept = load_peft_adapter(path, tiny_model_config, data=_bytes(path), keep_bf16=True)
    assert {w.a.dtype for w in kept.weights.values()} == {torch.float32}
    _same(kept.weights, load_peft_adapter(path, tiny_model_config).weights)


def test_a_bad_bf16_value_is_refused_by_name_on_the_fast_path(make_peft_adapter, tiny_model_config):
    path, _ = make_peft_adapter(dtype=torch.bfloat16, **QV)
    tensors = load_file(path / WEIGHTS_NAME)
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key][1, 2] = float("inf")
    save_file(tensors, path / WEIGHTS_NAME)
    with pytest.raises(InvalidAdapter, match="contains NaN or Inf") as info:
        load_peft_adapter(path, tiny_model_config, data=_bytes(path), keep_bf16=True)
    assert key in str(info.value)


def test_the_plan_is_reused_for_the_same_bytes_and_only_for_them(make_peft_adapter, tiny_model_config):
    path, _ = make_peft_adapter(**QV, lora_alpha=16)
    load_plan.cache_clear()
    first = load_peft_adapter(path, tiny_model_config)
    twin, _ = make_peft_adapter("twin", seed=1, **QV, lora_alpha=16)  # other values, same shapes
    second = load_peft_adapter(twin, tiny_model_config)
    assert load_plan.cache_info().hits == 1 and load_plan.cache_info().misses == 1
    assert not torch.equal(first.weights[(0, "q_proj")].b, second.weights[(0, "q_proj")].b)
    cfg = json.loads((twin / "adapter_config.json").read_text())
    (twin / "adapter_config.json").write_text(json.dumps(cfg | {"lora_alpha": 32}))
    rescaled = load_peft_adapter(twin, tiny_model_config)  # new config: new plan
    assert rescaled.weights[(0, "q_proj")].scale == 4.0
    for _ in range(2):  # a refusal is not cached: raised again, naming the same field
        with pytest.raises(AdapterIncompatible, match="max_rank=4"):
            load_peft_adapter(path, tiny_model_config, max_rank=4)
    tensors = load_file(twin / WEIGHTS_NAME)
    key = next(k for k in tensors if "layers.0.self_attn.q_proj.lora_A" in k)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, twin / WEIGHTS_NAME)  # same config, other header
    with pytest.raises(AdapterIncompatible, match="q_proj of layer 0"):
        load_peft_adapter(twin, tiny_model_config)


@pytest.mark.parametrize("mapped", [False, True])
def test_read_version_hashes_the_bytes_it_returns(make_peft_adapter, tiny_model_config, tmp_path, monkeypatch,
                                                  mapped):
    """Also with the weights read into a mapping faulted in at once (files of 1 MiB or more; this
    tiny adapter's only with the threshold lowered): the same bytes, and a changed file refused."""
    if mapped:
        monkeypatch.setattr(integrity, "MAPPED_MIN", 1)
    path, _ = make_peft_adapter(dtype=torch.bfloat16, **QV)
    store = AdapterStore(tmp_path / "store")
    store.put("a", path)
    version = store.get_path("a")
    digests, data = read_version(version, WEIGHTS_NAME)
    assert data == (path / WEIGHTS_NAME).read_bytes() and len(digests) >= 2
    assert isinstance(data, memoryview if mapped else bytearray) and not memoryview(data).readonly
    parsed = load_peft_adapter(version, tiny_model_config, data=data, keep_bf16=True)  # views of the buffer
    assert all(w.a.dtype == torch.bfloat16 for w in parsed.weights.values())
    assert read_version(version, WEIGHTS_NAME, max_keep=len(data) - 1)[1] is None  # hashed in chunks
    weights = version / WEIGHTS_NAME
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.chmod(0o644)
    weights.write_bytes(bytes(raw))
    for max_keep in (1 << 40, 0):
        with pytest.raises(IntegrityError, match="sha256"):
            read_version(version, WEIGHTS_NAME, max_keep)
    weights.write_bytes(bytes(raw[:-1]) + bytes([raw[-1] ^ 1]) + b"\0")  # the right bytes, one more
    with pytest.raises(IntegrityError, match=f"{len(raw) + 1} bytes"):
        read_version(version, WEIGHTS_NAME)
