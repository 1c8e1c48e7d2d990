"""The safetensors header check (pure) and the lazy adapter read it enables: a header that lies is
refused naming the tensor and the field, before any tensor is read; reading costs about one copy
of the weights, not two or three."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapter_store.peft_format import WEIGHTS_NAME, load_peft_adapter
from adapter_store.safetensors_header import read_header
from server.errors import InvalidAdapter

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def write_raw(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def refused(path: Path, *words: str) -> None:
    with pytest.raises(InvalidAdapter) as info:
        read_header(path, WEIGHTS_NAME)
    message = str(info.value)
    assert "corrupt or truncated" in message and info.value.param == WEIGHTS_NAME
    for word in words:
        assert word in message, f"{word!r} not in {message}"


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {"a": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.bfloat16), "c": torch.zeros(0, 5)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    entries = read_header(tmp_path / "x.safetensors", WEIGHTS_NAME)
    assert {k: (e.dtype, e.shape, e.end - e.begin) for k, e in entries.items()} == {
        "a": ("F32", (3, 4), 48), "b": ("BF16", (2,), 4), "c": ("F32", (0, 5), 0)}


def entry(dtype="F32", shape=(2, 2), offsets=(0, 16)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(("header", "data", "length", "words"), [
    ({KEY: entry()}, bytes(16), 10**9, ["header length", "1000000000"]),
    ({KEY: entry(offsets=(0, 32), shape=(4, 2))}, bytes(16), None, [KEY, "ends at byte 32", "16 bytes"]),
    ({KEY: entry(shape=(4, 4))}, bytes(16), None, [KEY, "data_offsets", "[4, 4]", "needs 64"]),
    ({KEY: entry(dtype="Q4")}, bytes(16), None, [KEY, "unknown dtype", "Q4"]),
    ({KEY: entry(), "b": entry(offsets=(8, 24))}, bytes(24), None, ["overlaps"]),
    ({KEY: entry(offsets=(4, 20))}, bytes(20), None, ["gap of 4 bytes"]),
    ({KEY: entry()}, bytes(20), None, ["4 bytes after the last tensor"]),
    ({KEY: entry(offsets=(16, 0))}, bytes(16), None, ["data_offsets", "begin <= end"]),
    ({KEY: entry(shape=(-2, 2))}, bytes(16), None, ["shape", "non-negative"]),
    ({KEY: {"dtype": "F32", "shape": [2, 2]}}, bytes(16), None, ["exactly dtype, shape and data_offsets"]),
    ({"__metadata__": {"x": 1}, KEY: entry()}, bytes(16), None, ["__metadata__"]),
])
def test_lying_headers_are_refused(tmp_path, header, data, length, words):
    refused(write_raw(tmp_path / "x.safetensors", header, data, length), *words)


def test_too_short_and_not_json(tmp_path):
    (tmp_path / "short").write_bytes(b"\x01\x02")
    refused(tmp_path / "short", "too short")
    (tmp_path / "garbage").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
    refused(tmp_path / "garbage", "not valid JSON")
    (tmp_path / "list").write_bytes(struct.pack("<Q", 2) + b"[]")
    refused(tmp_path / "list", "not a JSON object")


def test_integer_weights_are_refused_naming_the_tensor(tiny_model_config, make_peft_adapter):
    path, _ = make_peft_adapter(r=8, target_modules=["q_proj"])
    from safetensors.torch import load_file

    tensors = load_file(path / WEIGHTS_NAME)
    tensors[KEY] = tensors[KEY].to(torch.int32)
    save_file(tensors, path / WEIGHTS_NAME)
    with pytest.raises(InvalidAdapter) as info:
        load_peft_adapter(path, tiny_model_config)
    assert KEY in str(info.value) and "I32" in str(info.value)


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from adapter_store.peft_format import load_peft_adapter
    from server.model_config import ModelConfig

    def status(key):
        line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    cfg = ModelConfig.from_hf_dict(json.loads(sys.argv[2]))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = status("VmRSS")
    parsed = load_peft_adapter(Path(sys.argv[1]), cfg, max_rank=512)
    print(json.dumps({"peak_growth": status("VmHWM") - before, "nbytes": parsed.nbytes}))
""")


def test_reading_an_adapter_costs_about_one_copy(tmp_path):
    """Peak memory growth while parsing a 96 MB adapter stays near one copy of its weights (the old
    reader held the raw file, the parsed tensors and the cast copies: 2-3x). Measured in a fresh
    process as the growth of its peak RSS, reset just before the parse."""
    hidden, layers, rank = 1024, 12, 512
    config = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 128}
    out = tmp_path / "big"
    out.mkdir()
    tensors = {}
    for layer in range(layers):
        for m, parent in (("q_proj", "self_attn"), ("v_proj", "self_attn")):
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank) * 0.01
    save_file(tensors, out / WEIGHTS_NAME)
    del tensors
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj", "v_proj"]}))
    size = (out / WEIGHTS_NAME).stat().st_size
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(out), json.dumps(config)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert size > result["nbytes"] > 0.99 * size  # the file is (almost) all weights
    assert result["peak_growth"] < 1.4 * size, (result, size)
