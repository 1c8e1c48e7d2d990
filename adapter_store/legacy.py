"""Import stores written by the first layout: one directory per adapter, ``root/<id>/meta.json``.

Users have such stores on disk; opening one with this release imports every adapter into
``versions/`` + ``refs/`` (copying, so a crash mid-import loses nothing: the next open resumes) and
then moves the old directory to ``trash/``. The old layout's leftovers are handled as its own
recovery did: an ``.old-<uuid>`` directory (a replace interrupted between its two renames) is the
adapter's last good version if nothing replaced it, ``.deleted-*`` is garbage, ``.staging-*`` is
garbage once older than the staging age (processes of the old release can't share a store with
this one: stop them before upgrading).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from adapter_store.fsio import remove_tree, sha256_file, unique_token
from adapter_store.refs import is_valid_adapter_id
from server.errors import ServerError

if TYPE_CHECKING:
    from adapter_store.store import AdapterStore

log = logging.getLogger(__name__)

META_NAME = "meta.json"
_ASIDE = ".v1-"  # a first-layout adapter whose id is one of the new layout's names, moved aside


def set_aside_reserved(root: Path, reserved: tuple[str, ...]) -> None:
    """Before the new layout's directories are made: an old adapter named like one of them (it has a
    meta.json, which ours never do) is renamed out of the way, to be imported like the others."""
    for name in reserved:
        if (root / name / META_NAME).is_file():
            os.rename(root / name, root / f"{_ASIDE}{name}")


def import_legacy(store: AdapterStore, staging_min_age: float) -> list[str]:
    """Import every first-layout adapter under ``store.root``; returns the ids imported."""
    imported = []
    now = store.fs_now()
    for entry in sorted(store.root.iterdir(), key=lambda p: p.name):
        name = entry.name
        if not entry.is_dir():
            continue
        if name.startswith(".old-") and (entry / META_NAME).is_file():
            adapter_id = _meta_id(entry)
            # A replace crashed between its renames only if the id's own directory is missing.
            if adapter_id and not (store.root / adapter_id).exists() and _import(store, adapter_id, entry):
                imported.append(adapter_id)
            _trash(store, entry)
        elif (name.startswith(_ASIDE) or is_valid_adapter_id(name)) and (entry / META_NAME).is_file():
            adapter_id = name.removeprefix(_ASIDE)
            if _import(store, adapter_id, entry):
                imported.append(adapter_id)
            if store.key(adapter_id) is not None:  # imported now or before: the copy is redundant
                _trash(store, entry)
        elif name.startswith(".deleted-") or (
                name.startswith(".staging-") and now - entry.stat().st_mtime >= staging_min_age):
            _trash(store, entry)
    return imported


def _import(store: AdapterStore, adapter_id: str, directory: Path) -> bool:
    """Copy one old adapter in, unless its id already has a ref (imported, re-uploaded or deleted
    since). A weights file that no longer matches its recorded checksum is left where it is."""
    if store.key(adapter_id) is not None:
        return False
    try:
        meta = json.loads((directory / META_NAME).read_text())
        if sha256_file(directory / "adapter_model.safetensors") != meta["checksum"]:
            log.error("not importing adapter %s from %s: its weights do not match the recorded sha256",
                      adapter_id, directory)
            return False
        store.put(adapter_id, directory, created_at=float(meta["created_at"]))
    except (OSError, ValueError, KeyError, TypeError, ServerError) as exc:
        log.error("not importing adapter %s from %s: %s", adapter_id, directory, exc)
        return False
    log.info("imported adapter %s from the first store layout", adapter_id, extra={"adapter_id": adapter_id})
    return True


def _meta_id(directory: Path) -> str | None:
    try:
        adapter_id = json.loads((directory / META_NAME).read_text())["adapter_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return adapter_id if is_valid_adapter_id(adapter_id) else None


def _trash(store: AdapterStore, path: Path) -> None:
    target = store.root / "trash" / f"legacy-{unique_token()}"
    os.rename(path, target)
    remove_tree(target)
