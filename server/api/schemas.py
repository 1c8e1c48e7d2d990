"""Request and response bodies, in OpenAI's schema (plus ``adapter_id`` and vLLM's extras).

Requests validate types and coarse ranges here (a bad type is a 400 naming the field); the value
rules of sampling live in ``SamplingParams``, which raises ``InvalidRequest(param=...)`` too.
Unknown request fields are ignored, as OpenAI-compatible servers commonly do, except OpenAI's own
fields that would change the answer were they honoured (penalties, logit_bias, tools,
response_format, ...): those are declared, and a value other than their neutral one is a 400
(``check_supported``) rather than an answer that silently ignores them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.errors import InvalidRequest

MAX_N = 16
UNSUPPORTED_DOC = "Not supported: only its neutral value (shown as the default, or empty) is accepted."

ADAPTER_ID_DOC = (
    "Serve with this LoRA adapter (wins over `model`). Unset with `model` naming the base model or "
    "absent: the base model. An unknown id is a 404, never a silent fall-back."
)


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` and no choices.")


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="The base model's id, or an adapter id.")
    adapter_id: str | None = Field(None, description=ADAPTER_ID_DOC)
    temperature: float | None = Field(None, description="0 = greedy. Default 1.")
    top_p: float | None = None
    top_k: int | None = Field(None, description="-1 or 0 = off.")
    seed: int | None = Field(None, description="Per-request seed; choice i of n uses seed + i.")
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None
    n: int = Field(1, ge=1, le=MAX_N, description=f"Choices per prompt (at most {MAX_N}).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="End-user id; logged, not used.")
    frequency_penalty: float | None = Field(None, description=UNSUPPORTED_DOC + " 0.")
    presence_penalty: float | None = Field(None, description=UNSUPPORTED_DOC + " 0.")
    repetition_penalty: float | None = Field(None, description=UNSUPPORTED_DOC + " 1.")
    logit_bias: dict[str, float] | None = Field(None, description=UNSUPPORTED_DOC)
    response_format: dict[str, Any] | None = Field(None, description=UNSUPPORTED_DOC + ' {"type": "text"}.')
    tools: list[dict[str, Any]] | None = Field(None, description=UNSUPPORTED_DOC)
    tool_choice: str | dict[str, Any] | None = Field(None, description=UNSUPPORTED_DOC + ' "none".')
    functions: list[dict[str, Any]] | None = Field(None, description=UNSUPPORTED_DOC)
    function_call: str | dict[str, Any] | None = Field(None, description=UNSUPPORTED_DOC + ' "none".')

    def check_supported(self) -> None:
        """400 naming the first field set to something this server would not honour."""
        neutral = {
            "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
            "logit_bias": ({},), "response_format": ({"type": "text"},), "tools": ([],),
            "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
            "suffix": ("",), "best_of": (1,),
        }
        for name, allowed in neutral.items():
            value = getattr(self, name, None)
            if value is not None and value not in allowed:
                raise InvalidRequest(f"{name} is not supported by this server (got {value!r}); leave it "
                                     "out", param=name)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text, texts, token ids, or lists of token ids; each prompt is its own choice(s)."
    )
    max_tokens: int | None = Field(16, description="Tokens to generate at most. Default 16.")
    logprobs: int | None = Field(None, description="Return this many top logprobs per token (0..20).")
    echo: bool = Field(False, description="Not supported (must be false).")
    suffix: str | None = Field(None, description=UNSUPPORTED_DOC)
    best_of: int | None = Field(None, description=UNSUPPORTED_DOC + " 1.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, description="Default: whatever the context leaves.")
    max_completion_tokens: int | None = Field(None, description="Alias of max_tokens (newer OpenAI name).")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, description="Alternatives per token when logprobs is true.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lora-server"
    root: str | None = None
    parent: str | None = Field(None, description="For an adapter: the base model's id.")
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterPartCard(BaseModel):
    name: Literal["layers", "embed_tokens", "lm_head", "dora_scale"] = Field(
        ..., description="layers: LoRA on the layers' linear modules; embed_tokens / lm_head: LoRA on the "
        "embedding / the LM head; dora_scale: DoRA's per-output scales of every DoRA module.")
    modules: list[str]
    rank: int = Field(..., description="Largest rank over the part's modules (0 for dora_scale).")
    bytes: int = Field(..., description="The part's weights in their storage dtype in the pool.")
    pool_bytes: int = Field(..., description="Bytes of pool page rows the part takes when resident "
                                             "(the adapter's parts share its pages).")
    full_copy: bool = Field(False, description="A whole embedding / LM head (modules_to_save, or a saved "
                            "base layer other than the base model's) rather than only LoRA factors.")


class AdapterCard(BaseModel):
    id: str = Field(..., description="The id the caller uses: a tenant's own adapters unqualified, "
                    "`tenant:name` for a global key.")
    object: Literal["adapter"] = "adapter"
    tenant: str | None = Field(None, description="The owning tenant; null for an adapter of no tenant.")
    uid: int = Field(..., description="Unique per upload: a re-uploaded id gets a new uid.")
    parent: str = Field(..., description="The base model's id.")
    rank: int = Field(..., description="Largest rank over the adapter's modules.")
    alpha: float
    target_modules: list[str]
    size_bytes: int
    checksum: str
    location: Literal["disk", "host", "device"] = Field(..., description="Where the weights are now.")
    requests_served: int
    created: int
    use_dora: bool = Field(False, description="DoRA: each module's output is scaled by m / ||W0 + s B A||.")
    parts: list[AdapterPartCard] = Field(default_factory=list,
                                         description="The adapter's weights by part, with their sizes.")
    pool_bytes: int = Field(0, description="Pool pages the adapter takes when resident, in bytes.")
    vocab_size: int = Field(0, description="Token ids its requests may use: the base model's vocabulary, "
                            "or more when its embedding is a full copy with added tokens.")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
