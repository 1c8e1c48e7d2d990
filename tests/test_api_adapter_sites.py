"""A DoRA adapter with LoRA on embed_tokens and lm_head, on SmolLM2 over real HTTP, against PEFT.

SmolLM2 ties its LM head to the embedding and has a vocabulary of 49152: lm_head's B^T rows and
DoRA scales are 8 pages long each (pages of 6144 elements). The oracle is transformers + PEFT on
the same GGUF weights (bit for bit the server's, so the base embedding PEFT saves with the adapter
is recognised as the base's own and dropped).
"""

from __future__ import annotations

import os

import httpx
import pytest
import torch
from openai import OpenAI

from tests.test_api_adapters import upload

pytestmark = pytest.mark.slow

BASE = "SmolLM2-135M-Instruct"
PROMPT = "Once upon a time"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def dora_oracle(smollm2_path, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(smollm2_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens",
                                                                            "lm_head"])
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname or "lora_embedding_" in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in pname:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=gen) - 0.1)
    out = tmp_path_factory.mktemp("peft_dora") / "adapter"
    model.save_pretrained(out)
    ids = tokenizer(PROMPT).input_ids
    kwargs = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "attention_mask": torch.ones(1, len(ids),
                                                                                              dtype=torch.long)}
    with torch.no_grad():
        tokens = model.generate(torch.tensor([ids]), **kwargs)[0, len(ids):].tolist()
        with model.disable_adapter():
            base_tokens = model.generate(torch.tensor([ids]), **kwargs)[0, len(ids):].tolist()
    return {"dir": out, "prompt_ids": ids, "tokens": tokens, "base_tokens": base_tokens,
            "text": tokenizer.decode(tokens, skip_special_tokens=True)}


def test_dora_embedding_head_adapter_over_http_matches_peft(api_server, dora_oracle):
    assert dora_oracle["tokens"] != dora_oracle["base_tokens"], "the adapter must change the output"
    r = upload(api_server.url, "dora-emb-head", dora_oracle["dir"])
    assert r.status_code == 201, r.text
    card = r.json()
    assert card["use_dora"] and card["target_modules"] == ["embed_tokens", "lm_head", "q_proj", "v_proj"]
    parts = {p["name"]: p for p in card["parts"]}
    assert list(parts) == ["layers", "embed_tokens", "lm_head", "dora_scale"]
    assert parts["embed_tokens"]["bytes"] == 4 * 8 * (49152 + 576)
    assert parts["lm_head"]["bytes"] == 4 * 8 * (576 + 49152)
    assert parts["lm_head"]["pool_bytes"] == (8 * 576 + 64 * 6144) * 4  # A: 8 rows; B^T: 8 rows x 8 pieces
    # Its pages, rows packed by length: rows of 6144 (lm_head's B^T and g in pieces: 64 + 8), rows of
    # 576 (per layer q's A, B^T, g and v's A: 25 x 30, + embed B^T 8, g 1, lm_head A 8 = 767, 10 a
    # page: 77), rows of 192 (v's B^T and g: 270, 32 a page: 9), rows of 8 (embed A^T: 49152, 768 a
    # page: 64); the parts share them, so they hold at least the parts' rows.
    assert card["pool_bytes"] == (72 + 77 + 9 + 64) * 6144 * 4
    assert sum(p["pool_bytes"] for p in card["parts"]) <= card["pool_bytes"]
    client = OpenAI(base_url=f"{api_server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    for _ in range(2):  # cold (loaded into the pool by this request), then resident
        out = client.completions.create(model="dora-emb-head", prompt=dora_oracle["prompt_ids"],
                                        max_tokens=NEW_TOKENS, temperature=0)
        assert out.choices[0].text == dora_oracle["text"]
    assert httpx.get(f"{api_server.url}/v1/adapters/dora-emb-head").json()["location"] == "device"
