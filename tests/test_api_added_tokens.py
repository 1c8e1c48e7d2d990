"""An adapter with added tokens over real HTTP: its embedding and head (modules_to_save) and its own
tokenizer uploaded with it; text prompts using the new tokens are tokenized with the adapter's
tokenizer, and its outputs (new tokens included) decoded with it, in the same server that serves
the base model. The oracle is PEFT on the resized base, with the same tokenizer.

The tiny model has a word-level tokenizer of 300 words; the adapter's adds 8 (``<t0>`` .. ``<t7>``).
"""

from __future__ import annotations

import copy

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.engine_helpers import hf_greedy

pytestmark = pytest.mark.slow

VOCAB, ADDED, N = 300, 8, 6
WORDS = ["[UNK]", "<s>", "</s>", *(f"w{i}" for i in range(3, VOCAB))]
FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("added_tokens")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=128, tie_word_embeddings=False)).eval()
    base.save_pretrained(tmp / "model")
    _tokenizer().save_pretrained(tmp / "model")
    tokenizer = _tokenizer()
    tokenizer.add_tokens([f"<t{i}>" for i in range(ADDED)])
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(resized, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.3)
            elif "modules_to_save" in name and "lm_head" in name:
                param[VOCAB:] = torch.randn(ADDED, 64) * 0.5  # the new tokens get generated
    model.save_pretrained(tmp / "adapter")
    tokenizer.save_pretrained(tmp / "adapter")
    return tmp, base, model.eval(), tokenizer


def _upload(url: str, adapter_id: str, directory, names=FILES) -> httpx.Response:
    files = {n: (n, (directory / n).read_bytes(), "application/octet-stream") for n in names}
    return httpx.post(f"{url}/v1/adapters", files=files, data={"adapter_id": adapter_id}, timeout=120)


def test_adapter_tokenizer_and_added_tokens_over_http(api_server_factory, setup):
    tmp, base, peft_model, tokenizer = setup
    server = api_server_factory("--model", str(tmp / "model"), "--pool-bytes", "8MiB", "--block-size", "4")
    r = _upload(server.url, "tools", tmp / "adapter")
    assert r.status_code == 201, r.text
    card = r.json()
    assert {p["name"]: p["full_copy"] for p in card["parts"]} == {"layers": False, "embed_tokens": True,
                                                                  "lm_head": True}
    assert card["vocab_size"] == VOCAB + ADDED and card["target_modules"] == ["q_proj", "v_proj"]
    assert card["rank"] == 4
    prompt = "w5 <t3> w7 w8 <t0>"
    ids = tokenizer(prompt).input_ids
    assert ids[1] == VOCAB + 3 and ids[-1] == VOCAB
    want = hf_greedy(peft_model, ids, N)[0]
    assert any(t >= VOCAB for t in want)
    body = {"model": "tools", "prompt": prompt, "max_tokens": N, "temperature": 0, "ignore_eos": True}
    out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
    assert out["choices"][0]["text"] == tokenizer.decode(want)
    assert out["usage"]["prompt_tokens"] == len(ids)
    base_ids = _tokenizer()("w5 w6 w7").input_ids  # the base model, in the same server
    body = {"model": "model", "prompt": base_ids, "max_tokens": N, "temperature": 0, "ignore_eos": True}
    out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
    assert out["choices"][0]["text"] == _tokenizer().decode(hf_greedy(base, base_ids, N)[0])
    body = {"model": "model", "prompt": [5, VOCAB + 1], "max_tokens": 2}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 400 and f"[0, {VOCAB})" in r.json()["error"]["message"]  # the base has no <t1>


def test_a_tokenizer_larger_than_the_adapter_vocabulary_is_refused(api_server_factory, setup, tmp_path):
    tmp, _, _, tokenizer = setup
    server = api_server_factory("--model", str(tmp / "model"), "--pool-bytes", "8MiB", "--block-size", "4")
    for name in FILES[:2]:
        (tmp_path / name).write_bytes((tmp / "adapter" / name).read_bytes())
    big = copy.deepcopy(tokenizer)
    big.add_tokens(["<extra>"])
    big.save_pretrained(tmp_path)
    r = _upload(server.url, "too-many", tmp_path)
    assert r.status_code == 422 and "309 tokens" in r.json()["error"]["message"], r.text
    r = _upload(server.url, "half", tmp / "adapter", FILES[:2] + ("tokenizer_config.json",))
    assert r.status_code == 422 and "without tokenizer.json" in r.json()["error"]["message"], r.text
