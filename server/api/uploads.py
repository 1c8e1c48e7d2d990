"""Adapter uploads: a multipart body read under a byte cap, its files written to a staging dir.

The cap is enforced while the body streams in (a declared Content-Length over it is refused before
reading anything); file parts are spooled to disk, never held whole in memory. After a refusal the
rest of a modest body is read and discarded so the client sees the 413 instead of a reset socket.
The body's read timeout is ``RequestGuard``'s: ``receive`` raises RequestTimeout (408).
The form is strict: exactly the two files, ``adapter_id`` once, ``replace`` at most once; anything
else is a 400 naming the part, since a misspelt field silently ignored would store the wrong thing.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from adapter_store.peft_format import TOKENIZER_FILES
from server.api.errors import ClientDisconnected
from server.api.guards import DRAIN_LIMIT, drain
from server.errors import InvalidRequest, PayloadTooLarge

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
OPTIONAL_FILES = TOKENIZER_FILES  # the adapter's own tokenizer (added tokens)
FORM_FIELDS = ("adapter_id", "replace")
BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


@dataclass(frozen=True)
class AdapterUpload:
    adapter_id: str
    replace: bool


def _too_large(size: int | str, cap: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"upload of {size} bytes is over the limit of {cap} bytes (max_upload_bytes)",
                           param="file")


async def _capped_body(request: Request, cap: int) -> AsyncIterator[bytes]:
    total = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("client disconnected during upload")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > cap:
            if message.get("more_body", False):
                await drain(request.receive, DRAIN_LIMIT)
            raise _too_large(f"more than {cap}", cap)
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def receive_upload(request: Request, cap: int, dest: Path) -> AdapterUpload:
    """Parse the multipart upload into ``dest`` (adapter_config.json, adapter_model.safetensors).

    A file part is recognised by its field name or, failing that, its file name, so both
    ``-F adapter_config.json=@x`` and ``-F files=@adapter_config.json`` work.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        if int(declared) - cap <= DRAIN_LIMIT:
            await drain(request.receive, int(declared))
        raise _too_large(declared, cap)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("upload must be multipart/form-data with files adapter_config.json and "
                             "adapter_model.safetensors and the form field adapter_id", param="content-type")
    parser = MultiPartParser(request.headers, _capped_body(request, cap),
                             max_files=len(REQUIRED_FILES) + len(OPTIONAL_FILES) + 2, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}", param="file") from exc
    try:
        fields = _form_fields([(k, v) for k, v in form.multi_items() if isinstance(v, str)])
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        adapter_id = fields.get("adapter_id", "").strip()
        if not adapter_id:
            raise InvalidRequest("the form field adapter_id is required", param="adapter_id")
        await _save_files(files, dest)
        return AdapterUpload(adapter_id, _boolean(fields.get("replace", "false"), "replace"))
    finally:
        await form.close()


def _form_fields(items: list[tuple[str, str]]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for name, value in items:
        if name in REQUIRED_FILES:
            raise InvalidRequest(f"{name} must be sent as a file part (curl -F {name}=@path)", param=name)
        if name not in FORM_FIELDS:
            raise InvalidRequest(f"unexpected form field {name!r}; the fields are {', '.join(FORM_FIELDS)}",
                                 param=name)
        if name in fields:
            raise InvalidRequest(f"the form field {name} was sent twice", param=name)
        fields[name] = value
    return fields


def _boolean(value: str, param: str) -> bool:
    parsed = BOOLEANS.get(value.strip().lower())
    if parsed is None:
        raise InvalidRequest(f"{param} must be true or false, got {value!r}", param=param)
    return parsed


async def _save_files(files: list[tuple[str, UploadFile]], dest: Path) -> None:
    seen = set()
    accepted = (*REQUIRED_FILES, *OPTIONAL_FILES)
    for field_name, upload in files:
        name = field_name if field_name in accepted else Path(upload.filename or "").name
        if name not in accepted:
            raise InvalidRequest(f"unexpected file {upload.filename or field_name!r}; upload "
                                 f"{' and '.join(REQUIRED_FILES)} (and optionally the adapter's tokenizer: "
                                 f"{', '.join(OPTIONAL_FILES)})", param=field_name)
        if name in seen:
            raise InvalidRequest(f"{name} was sent twice", param=name)
        seen.add(name)
        await upload.seek(0)
        with (dest / name).open("wb") as out:
            await run_in_threadpool(shutil.copyfileobj, upload.file, out, 1 << 20)
    missing = [f for f in REQUIRED_FILES if f not in seen]
    if missing:
        raise InvalidRequest(f"missing file(s): {', '.join(missing)}", param=missing[0])
