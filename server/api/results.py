"""Engine outputs -> OpenAI response pieces: accumulated choices, usage, logprobs in both formats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.api.generation import GenerationGroup
from server.api.schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob, Usage
from server.engine_types import TokenLogprob


@dataclass
class ChoiceResult:
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)


async def collect(group: GenerationGroup) -> list[ChoiceResult]:
    """Run every choice to the end; the text of a choice is its outputs' ``new_text`` joined."""
    results = [ChoiceResult() for _ in group.choices]
    async for index, out in group.events():
        r = results[index]
        r.texts.append(out.new_text)
        r.logprobs.extend(out.logprobs)
        if out.finished:
            r.finish_reason = out.finish_reason
    for r, choice in zip(results, group.choices, strict=True):
        if r.finish_reason is None and choice.last is not None:
            r.finish_reason = choice.last.finish_reason or "abort"
    return results


def usage(group: GenerationGroup, n: int) -> Usage:
    """Prompt tokens count once per prompt (not once per each of its n choices)."""
    lasts = [c.last for c in group.choices]
    prompt = sum(o.num_prompt_tokens for i, o in enumerate(lasts) if o is not None and i % n == 0)
    completion = sum(o.num_output_tokens for o in lasts if o is not None)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Any, lps: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """The legacy completions format; ``offset`` is where this piece starts in the choice's text."""
    tokens = [token_text(tokenizer, lp.token_id) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in lps],
        top_logprobs=[{token_text(tokenizer, t): v for t, v in lp.top} for lp in lps],
        text_offset=offsets,
    )


def chat_logprobs(tokenizer: Any, lps: Sequence[TokenLogprob]) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        text = token_text(tokenizer, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for lp in lps:
        head = top(lp.token_id, lp.logprob)
        content.append(ChatTokenLogprob(token=head.token, logprob=head.logprob, bytes=head.bytes,
                                        top_logprobs=[top(t, v) for t, v in lp.top]))
    return ChatLogprobs(content=content)
