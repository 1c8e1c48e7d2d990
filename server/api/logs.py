"""Logging set-up: one line per record, with ``request_id`` and ``adapter_id`` fields on every line.

Modules log with ``extra={"request_id": ..., "adapter_id": ...}``; records without them show ``-``,
so the format never fails on a record from a library.
"""

from __future__ import annotations

import logging

FORMAT = ("%(asctime)s %(levelname)s %(name)s [request_id=%(request_id)s adapter_id=%(adapter_id)s] "
          "%(message)s")
FIELDS = ("request_id", "adapter_id")


class _DefaultFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name in FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, "-")
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_DefaultFields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers propagate to ours, so every line has the same shape.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
