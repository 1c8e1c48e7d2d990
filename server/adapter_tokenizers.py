"""Adapters' own tokenizers: saved with an adapter whose tokens were added (a larger embedding and
head in ``modules_to_save``), and used for its requests: prompts, chat template, decoded text.

Only fast tokenizers (``tokenizer.json``) are accepted: their files are JSON and Jinja (rendered in
transformers' sandbox), nothing that runs code. One is read per adapter version (uid) on first use
and kept until that version is dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from adapter_store.peft_format import TOKENIZER_FILES
from server.errors import AdapterIncompatible, AdapterUnavailable, InvalidAdapter
from server.model_config import ModelConfig
from server.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class AdapterTokenizers:
    def __init__(self, model: ModelConfig) -> None:
        self.eos_ids = model.eos_token_ids  # the model config's, as for the base tokenizer
        self._by_uid: dict[int, Tokenizer | None] = {}

    def get(self, uid: int, adapter_id: str, path: Path) -> Tokenizer | None:
        """Adapter ``uid``'s tokenizer (files in ``path``), or None if it has none. Any thread: two
        threads may both read it the first time, harmlessly."""
        if uid not in self._by_uid:
            try:
                tok = self._load(path) if (path / TOKENIZER_FILES[0]).is_file() else None
            except Exception as exc:  # validated at upload: the stored files went bad since
                log.exception("reading the tokenizer of adapter %s failed", adapter_id,
                              extra={"adapter_id": adapter_id})
                raise AdapterUnavailable(adapter_id) from exc
            self._by_uid[uid] = tok
        return self._by_uid[uid]

    def drop(self, uid: int) -> None:
        self._by_uid.pop(uid, None)

    def check(self, path: Path, vocab: int) -> None:
        """An uploaded tokenizer must load (a fast tokenizer) and fit the adapter's ``vocab``: every
        id it makes must be one the adapter's embedding has."""
        names = {n for n in TOKENIZER_FILES if (path / n).is_file()}
        if not names:
            return
        if TOKENIZER_FILES[0] not in names:
            message = (f"tokenizer files {sorted(names)} without {TOKENIZER_FILES[0]}: an adapter's "
                       "tokenizer must be a fast tokenizer (save_pretrained)")
            raise InvalidAdapter(message, param=TOKENIZER_FILES[0])
        try:
            size = self._load(path).vocab_size
        except Exception as exc:  # transformers raises many types for a bad tokenizer
            raise InvalidAdapter(f"the adapter's tokenizer cannot be loaded: {exc}",
                                 param=TOKENIZER_FILES[0]) from exc
        if size > vocab:
            raise AdapterIncompatible(
                f"the adapter's tokenizer has {size} tokens but its embedding has {vocab} rows (the base "
                "model's, unless modules_to_save holds a larger embedding)", param=TOKENIZER_FILES[0])

    def _load(self, path: Path) -> Tokenizer:
        return Tokenizer.from_dir(str(path), self.eos_ids)
