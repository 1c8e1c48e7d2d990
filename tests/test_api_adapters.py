"""The adapter API over real HTTP: upload a PEFT adapter made here, serve it, compare with PEFT.

The oracle is transformers + PEFT on the same GGUF weights: greedy tokens through the server with
the uploaded adapter must equal ``generate(do_sample=False)`` of the PEFT model.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import torch
from openai import NotFoundError, OpenAI
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow

BASE = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
ADAPTER_PROMPT = "Once upon a time"
NEW_TOKENS = 8
FILES = ("adapter_config.json", "adapter_model.safetensors")


def upload(url: str, adapter_id: str, directory: Path, replace: bool = False,
           headers: dict[str, str] | None = None) -> httpx.Response:
    files = {name: (name, (directory / name).read_bytes(), "application/octet-stream") for name in FILES}
    data = {"adapter_id": adapter_id, **({"replace": "true"} if replace else {})}
    return httpx.post(f"{url}/v1/adapters", files=files, data=data, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def oracle(smollm2_path, tmp_path_factory):
    """A random rank-8 q/v PEFT adapter for SmolLM2 saved to disk, with PEFT's greedy tokens for
    ADAPTER_PROMPT with and without it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(smollm2_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                # std 0.02-0.05 leaves SmolLM2's greedy tokens unchanged; 0.2 changes them and
                # keeps the text fluent.
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(out)
    ids = tokenizer(ADAPTER_PROMPT).input_ids
    mask = torch.ones(1, len(ids), dtype=torch.long)
    kwargs = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "attention_mask": mask}
    with torch.no_grad():
        with_adapter = model.generate(torch.tensor([ids]), **kwargs)[0, len(ids):].tolist()
        with model.disable_adapter():
            without = model.generate(torch.tensor([ids]), **kwargs)[0, len(ids):].tolist()
    return {"dir": out, "prompt_ids": ids, "tokens": with_adapter, "base_tokens": without,
            "text": tokenizer.decode(with_adapter, skip_special_tokens=True)}


@pytest.fixture(scope="module")
def client(api_server) -> OpenAI:
    return OpenAI(base_url=f"{api_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def uploaded(api_server, oracle) -> str:
    r = upload(api_server.url, "qv-r8", oracle["dir"])
    assert r.status_code == 201, r.text
    return "qv-r8"


def test_upload_describes_the_adapter(api_server, uploaded):
    card = httpx.get(f"{api_server.url}/v1/adapters/{uploaded}").json()
    assert card["id"] == uploaded and card["parent"] == BASE
    assert card["rank"] == 8 and card["alpha"] == 16
    assert sorted(card["target_modules"]) == ["q_proj", "v_proj"]
    assert card["size_bytes"] > 0 and len(card["checksum"]) == 64
    assert card["location"] in ("disk", "host", "device")
    listed = httpx.get(f"{api_server.url}/v1/adapters").json()["data"]
    assert uploaded in [a["id"] for a in listed]


def test_models_lists_adapter_with_parent(client, uploaded):
    models = {m.id: m for m in client.models.list().data}
    assert models[uploaded].parent == BASE and models[BASE].parent is None


def test_uploaded_adapter_matches_peft_greedy(client, uploaded, oracle):
    assert oracle["tokens"] != oracle["base_tokens"], "the random adapter must change the output"
    by_model = client.completions.create(model=uploaded, prompt=oracle["prompt_ids"], max_tokens=NEW_TOKENS,
                                         temperature=0)
    assert by_model.choices[0].text == oracle["text"]
    assert by_model.usage.completion_tokens == len(oracle["tokens"]) and by_model.model == uploaded
    by_field = client.completions.create(model=BASE, prompt=oracle["prompt_ids"], max_tokens=NEW_TOKENS,
                                         temperature=0, extra_body={"adapter_id": uploaded})
    assert by_field.choices[0].text == oracle["text"]
    base = client.completions.create(model=BASE, prompt=oracle["prompt_ids"], max_tokens=NEW_TOKENS,
                                     temperature=0)
    assert base.choices[0].text != oracle["text"]


def test_adapter_load_latency_is_in_metrics(api_server, client, uploaded, oracle):
    client.completions.create(model=uploaded, prompt=oracle["prompt_ids"], max_tokens=1, temperature=0)
    text = httpx.get(f"{api_server.url}/metrics").text
    counts = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("lora_server_adapter_load_seconds_count")}
    assert counts.get('tier="device"', 0) >= 1  # the adapter was copied into pool pages


def test_chat_with_adapter_streams(client, uploaded):
    messages = [{"role": "user", "content": "Name a color."}]
    full = client.chat.completions.create(model=uploaded, messages=messages, max_tokens=5, temperature=0)
    chunks = list(client.chat.completions.create(messages=messages, model=BASE, max_tokens=5, temperature=0,
                                                 stream=True, extra_body={"adapter_id": uploaded}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


def test_existing_id_is_409_unless_replace(api_server, uploaded, oracle):
    r = upload(api_server.url, uploaded, oracle["dir"])
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "adapter_exists" and uploaded in r.json()["error"]["message"]
    old_uid = httpx.get(f"{api_server.url}/v1/adapters/{uploaded}").json()["uid"]
    r = upload(api_server.url, uploaded, oracle["dir"], replace=True)
    assert r.status_code == 201 and r.json()["uid"] != old_uid


def test_incompatible_adapter_is_422_naming_module_and_shape(api_server, oracle, tmp_path):
    (tmp_path / FILES[0]).write_bytes((oracle["dir"] / FILES[0]).read_bytes())
    tensors = load_file(oracle["dir"] / FILES[1])
    key = next(k for k in tensors if "layers.0.self_attn.q_proj.lora_A" in k)
    tensors[key] = torch.randn(8, 100)
    save_file(tensors, tmp_path / FILES[1])
    r = upload(api_server.url, "wrong-shape", tmp_path)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "q_proj" in message and "576" in message and "100" in message
    assert httpx.get(f"{api_server.url}/v1/adapters/wrong-shape").status_code == 404


def test_bad_adapter_id_is_400(api_server, oracle):
    r = upload(api_server.url, "../escape", oracle["dir"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "adapter_id"


def test_missing_file_is_400(api_server, oracle):
    files = {FILES[0]: (FILES[0], (oracle["dir"] / FILES[0]).read_bytes())}
    r = httpx.post(f"{api_server.url}/v1/adapters", files=files, data={"adapter_id": "half"})
    assert r.status_code == 400 and "adapter_model.safetensors" in r.json()["error"]["message"]


def test_delete_then_404(api_server, client, oracle):
    assert upload(api_server.url, "short-lived", oracle["dir"]).status_code == 201
    r = httpx.delete(f"{api_server.url}/v1/adapters/short-lived")
    assert r.status_code == 200 and r.json() == {"id": "short-lived", "object": "adapter", "deleted": True}
    assert httpx.get(f"{api_server.url}/v1/adapters/short-lived").status_code == 404
    assert httpx.delete(f"{api_server.url}/v1/adapters/short-lived").status_code == 404
    with pytest.raises(NotFoundError):
        client.completions.create(model="short-lived", prompt=PROMPT, max_tokens=2)
