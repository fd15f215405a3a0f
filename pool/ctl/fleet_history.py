"""The fleet history: one JSON line per fleet operation, appended where the operator runs
``pool-ctl fleet`` (each host keeps its own per-model history as well).

Default file: ``$GPU_POOL_FLEET_HISTORY``, else ``$XDG_STATE_HOME/gpu-pool/fleet-history.jsonl``
(``~/.local/state/...``). A line is written with one ``write`` on an ``O_APPEND`` descriptor
and fsynced, so concurrent operators never interleave half-lines.
"""

from __future__ import annotations

import json
import os
from typing import Any


def default_history_path() -> str:
    explicit = os.environ.get("GPU_POOL_FLEET_HISTORY")
    if explicit:
        return explicit
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "gpu-pool", "fleet-history.jsonl")


def append(path: str, record: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str) -> list[dict[str, Any]]:
    """Every record, oldest first; a torn or foreign line is skipped, not fatal."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def last_committed_upgrade(records: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
    for rec in reversed(records):
        if rec.get("action") == "upgrade" and rec.get("model") == model:
            if rec.get("outcome") == "committed":
                return rec
    return None
