"""Logging setup for poold: called once from ``main()``, never at import.

Two formats, one line per record:

- ``text``: ``2026-11-26T13:51:40.123Z INFO pool.supervisor [pid 123] message``
- ``json``: ``{"ts": ..., "level": ..., "logger": ..., "pid": ..., "msg": ...}`` plus the
  structured fields in :data:`STRUCTURED_FIELDS` when a call passes them through
  ``extra=``, so journald/ELK can filter on ``model`` or ``worker_pid`` without regexes::

      log.info("worker %d ready", pid, extra={"model": "resnet", "version": "3",
                                              "worker_pid": pid, "device": "cuda:0"})

Timestamps are UTC with millisecond precision in both formats.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["STRUCTURED_FIELDS", "JsonFormatter", "TextFormatter", "setup_logging"]

# Only these ``extra`` keys are copied into JSON lines: a fixed set keeps the schema
# stable for log pipelines and keeps arbitrary LogRecord attributes out.
STRUCTURED_FIELDS: tuple[str, ...] = (
    "model", "version", "generation", "worker_pid", "device", "code",
)

# Marks the handler this module installed, so a second call replaces it.
_HANDLER_MARK = "_gpupool_handler"


def _utc_timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """Human-readable lines with the pid in every line (workers share the journal)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_timestamp(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; tracebacks go in ``exc`` so a record stays one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _utc_timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key in STRUCTURED_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a Path or an enum in extra= must not make logging itself fail.
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(fmt: str = "text", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Configure the root logger; calling it again replaces, never duplicates, the handler.

    ``fmt`` is "text" or "json"; ``level`` a logging level name (case-insensitive);
    ``stream`` defaults to stderr (journald captures it under systemd).
    """
    formatters: dict[str, type[logging.Formatter]] = {
        "text": TextFormatter, "json": JsonFormatter,
    }
    if fmt not in formatters:
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    levelno = logging.getLevelNamesMapping().get(level.upper())
    if levelno is None:
        raise ValueError(f"unknown log level {level!r}")

    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatters[fmt]())
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
