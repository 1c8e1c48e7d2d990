"""AdapterInfo for the API: what an adapter is and where it lives now. Plain Python."""

from __future__ import annotations

import json

from server.adapters import AdapterRef
from server.engine_types import AdapterInfo


def describe(ref: AdapterRef, on_device: bool, on_host: bool) -> AdapterInfo:
    cfg = _config(ref)
    targets = cfg.get("target_modules") or ()
    if isinstance(targets, str):
        targets = (targets,)
    ranks = [int(cfg.get("r", 8)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    if ref.spec is not None:
        ranks = [m.rank for m in ref.spec.modules.values()]
        targets = sorted({name for _, name in ref.spec.modules})
    return AdapterInfo(
        adapter_id=ref.adapter_id, uid=ref.uid, rank=max(ranks), alpha=float(cfg.get("lora_alpha", 8)),
        target_modules=tuple(targets), size_bytes=ref.meta.size_bytes, checksum=ref.meta.checksum,
        location="device" if on_device else "host" if on_host else "disk",
        requests_served=ref.requests_served, created=ref.meta.created_at,
    )


def _config(ref: AdapterRef) -> dict:
    try:
        return json.loads((ref.path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
