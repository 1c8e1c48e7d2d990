"""What tests look at inside an adapter store directory (the layout of adapter_store/store.py)."""

from __future__ import annotations

from pathlib import Path

from adapter_store.refs import REF_SUFFIX, StoredAdapterMeta, decode

CONTENT = ("refs", "versions", "staging")  # what uploads, replaces and deletes change


def stored_files(root: Path) -> dict[str, int]:
    """Every file an upload, replace or delete could leave (refs, versions, staging) -> its size.
    The bookkeeping that moves by itself (leases renewed by the running server, locks, the file
    system clock) is left out."""
    return {str(p.relative_to(root)): p.stat().st_size
            for d in CONTENT if (root / d).is_dir() for p in sorted((root / d).rglob("*")) if p.is_file()}


def weights_file(root: Path, adapter_id: str) -> Path:
    """The adapter_model.safetensors of the version ``adapter_id`` names now."""
    record = decode((root / "refs" / f"{adapter_id}{REF_SUFFIX}").read_bytes())
    assert isinstance(record, StoredAdapterMeta), f"{adapter_id} is deleted"
    return root / "versions" / record.version / "adapter_model.safetensors"
