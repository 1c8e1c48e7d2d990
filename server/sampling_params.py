"""Per-request sampling parameters: a frozen, validated dataclass. No torch.

Ranges follow the OpenAI API (which vLLM accepts too): temperature 0..2, top_p in (0, 1], up to 20
logprobs. Stop strings are more lenient than OpenAI's 4: up to ``MAX_STOP_STRINGS``, each non-empty.
Every error is ``InvalidRequest`` with ``param`` set to the offending field, so the HTTP layer can
answer 400 with ``param`` filled in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.errors import InvalidRequest

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_TEMPERATURE = 2.0
# Below this a temperature is treated as 0 (greedy): dividing logits by ~0 only overflows (vLLM's eps).
GREEDY_EPS = 1e-5
# torch.Generator.manual_seed accepts exactly this range.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(f"{field} {message}", param=field)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request.

    - ``max_tokens``: tokens to generate at most (>= 1).
    - ``temperature``: logits are divided by it; 0 means greedy (argmax).
    - ``top_p``: nucleus sampling, keep the smallest set of tokens whose mass is >= top_p; 1 = off.
    - ``top_k``: keep the k most likely tokens; -1 or 0 = off.
    - ``seed``: per-request generator seed; the same seed gives the same tokens whatever else is in
      the batch. None = the engine's shared generator.
    - ``stop`` / ``stop_token_ids``: generation ends at any of these strings / token ids.
    - ``ignore_eos``: keep generating past the EOS token.
    - ``logprobs``: None = none; k >= 0 = the chosen token's logprob plus the top-k alternatives.
    - ``min_tokens``: EOS and ``stop_token_ids`` are suppressed until this many tokens exist.

    A ``str`` or list for ``stop`` and a list for ``stop_token_ids`` are normalized to tuples.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0

    def __post_init__(self) -> None:
        # Normalize before validating so callers may pass lists (JSON) or a single stop string.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate_numbers()
        self._validate_stops()

    def _validate_numbers(self) -> None:
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
                 f"must be an integer >= 1, got {self.max_tokens!r}")
        _require(_is_number(self.temperature) and 0.0 <= self.temperature <= MAX_TEMPERATURE,
                 "temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        _require(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p",
                 f"must be in (0, 1], got {self.top_p!r}")
        _require(_is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1), "top_k",
                 f"must be -1 or 0 (disabled) or an integer >= 1, got {self.top_k!r}")
        _require(self.seed is None or (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
                 "seed", f"must be null or an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        _require(isinstance(self.ignore_eos, bool), "ignore_eos",
                 f"must be a boolean, got {self.ignore_eos!r}")
        _require(self.logprobs is None or (_is_int(self.logprobs)
                                           and 0 <= self.logprobs <= MAX_LOGPROBS),
                 "logprobs", f"must be null or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        _require(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
                 f"must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")

    def _validate_stops(self) -> None:
        _require(isinstance(self.stop, tuple) and len(self.stop) <= MAX_STOP_STRINGS, "stop",
                 f"must be a list of at most {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop",
                 f"must be a list of at most {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")
        _require(isinstance(self.stop_token_ids, tuple)
                 and all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
                 f"must be a list of integers >= 0, got {self.stop_token_ids!r}")

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax: temperature ~0, or top_k == 1.

        top_k == 1 keeps only the most likely token by definition; routing it through argmax means it
        consumes no randomness and breaks ties like greedy does (lowest token id).
        """
        return self.temperature < GREEDY_EPS or self.top_k == 1
