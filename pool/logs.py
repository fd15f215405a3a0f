"""Logging setup for poold: called once from ``main()``, never at import.

Two formats, one line per record:

- ``text``: ``2026-11-26T13:51:40.123Z INFO pool.supervisor [pid 123] message``
- ``json``: ``{"ts": ..., "level": ..., "logger": ..., "pid": ..., "msg": ...}`` plus the
  structured fields in :data:`STRUCTURED_FIELDS` when a call passes them through
  ``extra=``, so journald/ELK can filter on ``model`` or ``worker_pid`` without regexes::

      log.info("worker %d ready", pid, extra={"model": "resnet", "version": "3",
                                              "worker_pid": pid, "device": "cuda:0"})

Timestamps are UTC with millisecond precision in both formats.

Under systemd, when stderr *is* the journal (``$JOURNAL_STREAM`` names stderr's device
and inode), every line starts with a ``<N>`` syslog priority (``<3>`` error, ``<4>``
warning, ``<6>`` info, ``<7>`` debug), which journald strips and stores as PRIORITY, so
``journalctl -p err`` shows the errors; a traceback keeps its record's priority on every
line. The timestamp is left out there: the journal has its own.

What children write to stderr (the spawner, workers: faulthandler stack dumps, torch
warnings, stray prints) goes through :class:`StderrRelay` when the log is JSON or the
journal: each line becomes a record of logger ``child.stderr`` at WARNING, so JSON mode
emits only JSON and the journal gets a priority for them too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = [
    "STRUCTURED_FIELDS",
    "JsonFormatter",
    "StderrRelay",
    "TextFormatter",
    "current_format",
    "setup_logging",
    "stderr_is_journal",
]

# Only these ``extra`` keys are copied into JSON lines: a fixed set keeps the schema
# stable for log pipelines and keeps arbitrary LogRecord attributes out.
STRUCTURED_FIELDS: tuple[str, ...] = (
    "model", "version", "generation", "worker_pid", "device", "code",
    "event", "path", "digest", "peer_uid", "strategy", "why", "phase", "bytes_freed",
    "outcome", "elapsed_s",
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


# syslog priorities by logging level, for journald's <N> line prefix.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}
_state = {"format": "text", "journal": False}


def stderr_is_journal(env: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when ``fd`` is the stream systemd connected to the journal for us."""
    env = os.environ if env is None else env
    dev, sep, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def priority(levelno: int) -> int:
    for threshold, prio in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= threshold:
            return prio
    return 7


class JournalFormatter(logging.Formatter):
    """``<3>ERROR pool.x [pid 1] message`` on every line of the record."""

    def __init__(self, inner: logging.Formatter, timestamps: bool) -> None:
        super().__init__()
        self.inner = inner
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        if not self.timestamps and text[:4].isdigit():
            text = text.split(" ", 1)[1] if " " in text else text  # journald stamps it
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def current_format() -> str:
    """The format setup_logging installed ("text" or "json")."""
    return str(_state["format"])


def relay_wanted() -> bool:
    """Whether children's stderr should be turned into records (see StderrRelay)."""
    return _state["format"] == "json" or bool(_state["journal"])


class StderrRelay:
    """A pipe for children's stderr; a thread turns each line into a log record."""

    def __init__(self, logger: str = "child.stderr") -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_inheritable(self.write_fd, True)
        self.log = logging.getLogger(logger)
        self.thread = threading.Thread(target=self._run, name="stderr-relay", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with os.fdopen(self.read_fd, "rb", buffering=0) as f:
            pending = b""
            while True:
                chunk = f.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        self.log.warning("%s", line.decode(errors="replace").rstrip())
            if pending.strip():
                self.log.warning("%s", pending.decode(errors="replace").rstrip())

    def close_write_end(self) -> None:
        """Once the children hold it: our copy must go, so EOF comes when they exit."""
        try:
            os.close(self.write_fd)
        except OSError:
            pass


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
    journal = stream is None and stderr_is_journal()
    formatter = formatters[fmt]()
    handler.setFormatter(JournalFormatter(formatter, fmt == "json") if journal else formatter)
    _state.update(format=fmt, journal=journal)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
