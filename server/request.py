"""A request's state as the scheduler sees it. Plain Python; no torch."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine_types import FinishReason
    from server.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order: FCFS sorts on it, preemption picks the largest
    adapter_uid: int | None = None
    adapter_name: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    max_total_tokens: int = 1 << 30  # the model's context length
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the pages
    # block_table[layer][b] is the page holding tokens [b*block_size, (b+1)*block_size) of layer.
    block_table: list[list[int]] = field(default_factory=list)
    # Prefix caching: hashes of the full blocks seen so far (server/prefix_cache.py), and how many
    # leading blocks were already offered to the cache (taken from it, or registered).
    block_hashes: list[bytes] = field(default_factory=list)
    num_offered_blocks: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_blocks(self) -> int:
        return len(self.block_table[0]) if self.block_table else 0

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without building the concatenation."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - p]

    def check_stop(self) -> FinishReason | None:
        """Token-level stop conditions after a token was appended (stop strings are the detokenizer's)."""
        if not self.output_token_ids:
            return None
        last = self.output_token_ids[-1]
        n_out = len(self.output_token_ids)
        if n_out >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                return "stop"
            if last in self.params.stop_token_ids:
                return "stop"
        if n_out >= self.params.max_tokens or self.num_tokens >= self.max_total_tokens:
            return "length"
        return None
