"""Named points on the upload, commit and delete paths where a test can crash or slow the process.

Crash-consistency claims ("a kill -9 anywhere leaves the store consistent") are only as good as
the kill points tried, and a kill after a random delay rarely lands inside a rename. So the write
path names its steps, and ``LORA_FAILPOINTS`` (read once, at import) arms some of them, as etcd's
gofail does::

    LORA_FAILPOINTS="commit.version_renamed=kill"            # SIGKILL this process right there
    LORA_FAILPOINTS="stage.files_written=sleep:0.2,commit.locked=sleep:0.2"   # widen windows

Unset (every real deployment), ``failpoint`` is one lookup in an empty dict. tests/test_crash_store.py
drives every point in ``POINTS``.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)

ENV = "LORA_FAILPOINTS"
# In the order an upload (or a delete) passes them.
POINTS = (
    "upload.received",  # the multipart body is on local disk; nothing staged
    "stage.files_written",  # the adapter files are in staging, fsynced; no manifest yet
    "stage.done",  # staging complete (manifest, directory fsync); validation next
    "commit.locked",  # the commit lock is held; nothing renamed
    "commit.before_version_rename",
    "commit.version_renamed",  # versions/<sha> exists; its directory entry not yet fsynced
    "ref.tmp_written",  # the new ref's temp file is written and fsynced, not yet renamed
    "ref.renamed",  # the ref names the new version (or the tombstone); directory not yet fsynced
    "commit.done",  # committed and durable; the registry not yet updated
    "upload.committed",  # the response is about to be sent
    "delete.locked",  # a delete holds the commit lock; the ref is unchanged
)


def _parse(spec: str) -> dict[str, tuple[str, float]]:
    armed = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        kind, _, arg = action.partition(":")
        if name not in POINTS or kind not in ("kill", "sleep"):
            raise ValueError(f"{ENV}: bad entry {item!r}; points are {', '.join(POINTS)}, actions "
                             "kill and sleep:<seconds>")
        armed[name] = (kind, float(arg or 0))
    return armed


_ARMED = _parse(os.environ.get(ENV, ""))


def failpoint(name: str) -> None:
    """Crash or pause here if ``LORA_FAILPOINTS`` arms ``name``; otherwise nothing."""
    action = _ARMED.get(name)
    if action is None:
        return
    kind, seconds = action
    if kind == "sleep":
        time.sleep(seconds)
        return
    log.warning("failpoint %s: killing this process (SIGKILL)", name)
    os.kill(os.getpid(), signal.SIGKILL)
