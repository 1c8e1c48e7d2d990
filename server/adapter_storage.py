"""How an adapter's rows are stored in the pool: the model dtype or bf16 (``EngineConfig.adapter_dtype``).

Why: decode streams every resident adapter's rows once per step; bf16 rows halve those bytes, and
the native and torch backends widen them to fp32 as they load them (a shift). Pure policy: which
dtype, chosen once per parsed adapter; the pages' layout follows it (server/page_layout.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from adapter_store.peft_format import ParsedAdapter


@dataclass(frozen=True)
class AdapterStorage:
    """How an adapter's rows are stored in the pool (``EngineConfig.adapter_dtype``): the model
    dtype, or bf16 where the LoRA backend reads bf16 rows and either the user asked for it
    (``bfloat16``) or it loses nothing (``auto``): the file's weights are bf16 and so is every row
    made from them. Rows computed at load need not be: a DoRA scale ``g`` (fp32 norms; bf16 would
    move every output of the module by up to 0.4%) or a full copy joined with its scaled LoRA
    (server/adapter_prep.py); such an adapter keeps the model dtype."""

    mode: str  # auto | model | bfloat16
    model_dtype: torch.dtype
    readable: tuple[torch.dtype, ...]  # by the LoRA backend

    def dtype_for(self, parsed: ParsedAdapter) -> str | None:
        """The storage dtype's name, or None for the model's own."""
        if self.mode == "model" or self.model_dtype == torch.bfloat16 or torch.bfloat16 not in self.readable:
            return None
        if self.mode == "bfloat16":
            return "bfloat16"
        if parsed.source_dtype == torch.bfloat16 and all(_bf16_exact(t) for t in _rows_of(parsed)):
            return "bfloat16"
        return None


def _rows_of(parsed: ParsedAdapter) -> Iterator[torch.Tensor]:
    """The rows computed at load (DoRA scales, full copies: server/adapter_prep.py). A and B of a
    plain LoRA module are the file's bf16 values (kept bf16 on the host, or cast): exact in bf16, unchecked
    (the round trip cost ~5 ms per q,k,v,o adapter, a third of its load)."""
    for w in parsed.weights.values():
        yield from (t for t in ((w.a, w.b) if w.replace else ()) + (w.dora_scale,) if t is not None)


def _bf16_exact(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 or torch.equal(t, t.to(torch.bfloat16).to(t.dtype))
