"""The model's own tokenizer (via transformers) and an incremental, stop-aware detokenizer.

No torch here: the engine and API use this for prompts, chat templates and streamed text. There is
no hand-written BPE: transformers reads ``tokenizer.json`` from a Hugging Face directory or
rebuilds the tokenizer from a GGUF file's metadata, so token ids match the oracle exactly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

from server.errors import InvalidRequest

logger = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant", "tool", "developer")


class Tokenizer:
    """A thin, typed wrapper over a transformers tokenizer.

    ``eos_token_ids`` merges every id that ends generation: the tokenizer's EOS, the model
    config's ``eos_token_id`` (may be a list) and ``generation_config.json``'s if present.
    """

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Iterable[int] = ()) -> None:
        self.hf = hf_tokenizer
        eos = [hf_tokenizer.eos_token_id, *extra_eos_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
        self.vocab_size: int = len(hf_tokenizer)
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id

    def with_eos_ids(self, eos_ids: Iterable[int]) -> Tokenizer:
        """A tokenizer over the same HF tokenizer with ``eos_ids`` added to ``eos_token_ids``."""
        return Tokenizer(self.hf, [*self.eos_token_ids, *eos_ids])

    @classmethod
    def from_dir(cls, path: str, config_eos_ids: Iterable[int] = ()) -> Tokenizer:
        """Load the tokenizer files of a Hugging Face model directory (never from a hub).

        A directory whose ``tokenizer_class`` is the generic fast tokenizer is loaded by that class
        itself: ``AutoTokenizer`` would pick the same class, after importing the tokenizer registry
        of every model transformers knows (measured: 3.5 s of each server's and adapter tokenizer's
        load, against 0.7 s). Any other class goes through ``AutoTokenizer``."""
        if _tokenizer_class(path) in GENERIC_FAST_TOKENIZERS:
            from transformers import PreTrainedTokenizerFast as loader
        else:
            from transformers import AutoTokenizer as loader

        hf = loader.from_pretrained(path, local_files_only=True)
        return cls(hf, [*config_eos_ids, *_generation_config_eos(path)])

    @classmethod
    def from_gguf(cls, gguf_path: str, config_eos_ids: Iterable[int] = ()) -> Tokenizer:
        """Rebuild the tokenizer stored in a GGUF file's metadata."""
        from transformers import AutoTokenizer

        directory, name = os.path.split(os.path.abspath(gguf_path))
        hf = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
        return cls(hf, [*config_eos_ids, *_generation_config_eos(directory)])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the model's own chat template.

        Raises ``InvalidRequest`` when the model has no template, the messages are malformed, or
        the template itself rejects them (e.g. roles that don't alternate).
        """
        if not self.has_chat_template:
            raise InvalidRequest(
                "this model has no chat template; use the completions endpoint with a plain prompt",
                param="messages",
            )
        clean = _validate_messages(messages)
        from jinja2 import TemplateError

        try:
            ids = self.hf.apply_chat_template(
                clean, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            )
        except TemplateError as e:
            raise InvalidRequest(f"chat template rejected the messages: {e}", param="messages") from e
        return [int(i) for i in ids]


# tokenizer_config.json's class names of the generic fast tokenizer (transformers 5 saves the first;
# in transformers 5 the second is an alias of it).
GENERIC_FAST_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _tokenizer_class(directory: str) -> str | None:
    """``tokenizer_class`` of the directory's tokenizer_config.json (None if absent or unreadable)."""
    try:
        with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
            name = json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _generation_config_eos(directory: str) -> list[int]:
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def _validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check the chat messages' shape; text-part lists (OpenAI style) are joined into one string."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param="messages")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}", param="messages"
            )
        if isinstance(content, list):
            content = _join_text_parts(content, i)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string", param="messages")
        clean.append({"role": role, "content": content})
    return clean


def _join_text_parts(parts: list[Any], i: int) -> str:
    texts = []
    for p in parts:
        if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
            raise InvalidRequest(f"messages[{i}].content parts must be text parts", param="messages")
        texts.append(p["text"])
    return "".join(texts)


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time.

    Decoding uses a sliding window like vLLM's detokenizer: ``ids[prefix_offset:]`` is decoded
    and compared with ``ids[prefix_offset:read_offset]``, so each step costs a few tokens, not
    the whole sequence, while the tokenizer still sees enough context for its space handling.
    A window whose text ends in U+FFFD is an incomplete UTF-8 character: we wait for more tokens.

    Stop strings: text is truncated before the first stop string found (which is excluded),
    ``stopped`` becomes True and ``stop_reason`` names the string. Text that could be the start
    of a stop string is held back until it can't, so no part of a stop string is ever emitted;
    ``flush()`` releases it when generation ends for another reason.
    """

    # A valid UTF-8 character is at most 4 bytes, so at most 4 byte-level tokens wait on one.
    # A longer run ending in U+FFFD is genuinely invalid output: emit it rather than stall.
    _MAX_PENDING_TOKENS = 4

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # all text decoded so far (truncated at a stop string)
        self._emitted = 0  # characters of _text already returned
        self.stopped = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text[: self._emitted]

    def add(self, token_id: int) -> str:
        """Append one token id; return the newly releasable text (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        self._extend(self._decode_delta(force=False))
        return self._release(final=False)

    def flush(self) -> str:
        """Release everything still held back (incomplete characters, possible stop prefixes)."""
        if self.stopped:
            return self._release(final=True)
        if self._read_offset < len(self.ids):
            self._extend(self._decode_delta(force=True))
        return self._release(final=True)

    def _decode_delta(self, force: bool) -> str:
        window = self.ids[self._prefix_offset :]
        n_prefix = self._read_offset - self._prefix_offset
        prefix_text = self.tokenizer.decode(window[:n_prefix], self.skip_special_tokens)
        new_text = self.tokenizer.decode(window, self.skip_special_tokens)
        pending = len(self.ids) - self._read_offset
        incomplete = new_text.endswith("\ufffd") and pending <= self._MAX_PENDING_TOKENS
        if (len(new_text) <= len(prefix_text) or incomplete) and not force:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        return new_text[len(prefix_text) :]

    def _extend(self, delta: str) -> None:
        if not delta:
            return
        # Only a stop string that ends inside the new text can be new; start the search early
        # enough to catch one that began in earlier (held-back) text.
        start = max(0, len(self._text) - self._max_stop + 1)
        self._text += delta
        hits = [(i, s) for s in self.stop if (i := self._text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits, key=lambda h: h[0])
            self._text = self._text[:i]
            self.stopped, self.stop_reason = True, s

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if not (final or self.stopped):
            end -= self._stop_prefix_len()
        out = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best
