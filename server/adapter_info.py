"""AdapterInfo for the API: what an adapter is, its parts and sizes, where it lives now. Plain Python."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from server.adapter_residency import AdapterSpec
from server.adapters import AdapterRef
from server.engine_types import AdapterInfo, AdapterPart
from server.model_config import KERNEL_MODULES, MODEL_MODULES
from server.page_layout import STORAGE_ITEMSIZE, PageLayout, stored_shape


def describe(ref: AdapterRef, on_device: bool, on_host: bool, layout: PageLayout,
             itemsize: int, base_vocab: int) -> AdapterInfo:
    """``layout`` and ``itemsize`` (bytes per element of the serving dtype) size the parts;
    ``base_vocab``: the base model's vocabulary (an adapter's own is larger with added tokens)."""
    cfg = _config(ref)
    targets = cfg.get("target_modules") or ()
    if isinstance(targets, str):
        targets = (targets,)
    ranks = [int(cfg.get("r", 8)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    parts: tuple[AdapterPart, ...] = ()
    vocab = base_vocab
    if ref.spec is not None:  # the LoRA targets and ranks, not those of full copies (see parts)
        copies = {str(e).rsplit(".", 1)[-1] for e in cfg.get("modules_to_save") or ()}
        lora = [(name, m) for (_, name), m in ref.spec.modules.items() if not (m.replace and name in copies)]
        ranks = [m.rank for _, m in lora if not m.replace] or ranks
        targets = sorted({name for name, _ in lora})
        parts = adapter_parts(ref.spec, layout, itemsize)
        vocab = ref.spec.vocab(base_vocab)
    return AdapterInfo(
        adapter_id=ref.adapter_id, uid=ref.uid, rank=max(ranks), alpha=float(cfg.get("lora_alpha", 8)),
        target_modules=tuple(targets), size_bytes=ref.meta.size_bytes, checksum=ref.meta.checksum,
        location="device" if on_device else "host" if on_host else "disk",
        requests_served=ref.requests_served, created=ref.meta.created_at,
        use_dora=bool(cfg.get("use_dora")), parts=parts,
        pool_bytes=ref.spec.pages_needed(layout) * layout.page_bytes if ref.spec is not None else 0,
        vocab_size=vocab,
    )


@dataclass
class _Sum:
    modules: list[str] = field(default_factory=list)
    rank: int = 0
    elems: int = 0
    slots: int = 0  # elements of the page rows its matrices take (long rows cut into page-long pieces)
    full_copy: bool = False

    def add(self, module: str, rank: int, elems: int, slots: int, full_copy: bool = False) -> None:
        if module not in self.modules:
            self.modules.append(module)
        self.rank, self.elems, self.slots = max(self.rank, rank), self.elems + elems, self.slots + slots
        self.full_copy |= full_copy


def adapter_parts(spec: AdapterSpec, layout: PageLayout, itemsize: int) -> tuple[AdapterPart, ...]:
    """The adapter's weights by part (see ``AdapterPart``), in that order; parts it lacks are left out.
    ``itemsize``: bytes per element of the serving dtype (an adapter stored in bf16 takes 2).

    A part's ``pool_bytes`` are the page rows its matrices take: parts share the adapter's pages
    (server/adapter_packing.py), whose unused tails belong to none, so the adapter's pages (its
    ``AdapterInfo.pool_bytes``) hold at least their sum."""
    item = STORAGE_ITEMSIZE[spec.dtype] if spec.dtype else itemsize
    elems = layout.page_bytes // item

    def slots(shape: tuple[int, int]) -> int:
        rows, length = stored_shape(*shape, elems)
        return rows * length

    sums: dict[str, _Sum] = {}
    in_order = sorted(spec.modules.items(), key=lambda kv: (KERNEL_MODULES.index(kv[0][1]), kv[0][0]))
    for (_, module), m in in_order:
        a, b, *dora = m.matrices
        part = sums.setdefault(module if module in MODEL_MODULES else "layers", _Sum())
        part.add(module, m.rank, a[0] * a[1] + b[0] * b[1], slots(a) + slots(b), m.replace)
        if dora:
            sums.setdefault("dora_scale", _Sum()).add(module, 0, dora[0][0] * dora[0][1], slots(dora[0]))
    return tuple(AdapterPart(name, tuple(p.modules), p.rank, p.elems * item, p.slots * item, p.full_copy)
                 for name in ("layers", *MODEL_MODULES, "dora_scale") if (p := sums.get(name)) is not None)


def _config(ref: AdapterRef) -> dict:
    try:
        return json.loads((ref.path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
