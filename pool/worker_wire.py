"""What a worker says on the backend socket: one frozen record per kind, decoded once.

The router hands poold each ``b"E"`` event as a msgpack map (docs/PROTOCOL.md, "router
<-> worker"; the worker side is ``workers.serve.Worker.event``)::

    kind      fields read (every one optional unless marked)
    hello     pid, model, version, device
    phase     pid, phase* (loading | staged | warming | validating),
              bytes and total (loading), staged_s (staged)
    ready     pid, timings {str: seconds}, sent_at, rss, heap_frozen, sandbox {..},
              contract {..}, schema {..}, graphs {sizes: [int], skipped: [str]}
    hb        pid, served, model_errors, rss, signatures [{inputs: ..}], batches [[int, int]]
    contract  pid, contract {..}
    failed    pid, stage*, reason*, traceback
    bye       pid, served

``decode`` is the only reader of that map: the shell calls it as the event arrives
(``pool.daemon``) and the supervisor gets the record (``pool.events.WorkerMessage``),
never the map. Keys it does not know are ignored (a minor version may add some). A
known key of the wrong type, a missing required one or an unknown kind makes the whole
message ``Malformed``: nothing in it is believed (the supervisor logs it and leaves the
worker's record as it was). A wrong value must never raise inside the loop: ``rss:
"lots"`` once would have, out of ``int()``. The contract, the input signatures and the
schema are decoded here too; one that does not parse is dropped with its problem kept
for the log, as before, and the rest of the message stands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pool.contract import MAX_EXAMPLES, Contract, ContractError, ForwardSchema, InputSignature

MAX_BATCH_PAIRS = 1024  # a heartbeat's batch sizes kept; a worker sends a few
MAX_REASON = 2000
MAX_TRACEBACK = 8000


class PhaseName(StrEnum):
    LOADING = "loading"
    STAGED = "staged"  # a held worker's weights are on the host; it waits for "go"
    WARMING = "warming"
    VALIDATING = "validating"


@dataclass(frozen=True)
class Hello:
    pid: int | None
    model: str = ""
    version: str = ""
    device: str = ""


@dataclass(frozen=True)
class Phase:
    pid: int | None
    phase: PhaseName
    done: int | None = None  # loading: bytes of the model file read so far
    total: int | None = None
    staged_s: float | None = None


@dataclass(frozen=True)
class Graphs:
    sizes: tuple[int, ...] = ()  # batch sizes captured as CUDA graphs
    skipped: tuple[str, ...] = ()  # why some were not


@dataclass(frozen=True)
class Ready:
    pid: int | None
    timings: Mapping[str, float] = field(default_factory=dict)
    sent_at: float | None = None  # the worker's clock as it sent this (same host)
    rss: int = 0
    heap_frozen: int = 0
    sandbox: Mapping[str, Any] | None = None  # workers.sandbox.SandboxReport's wire map
    contract: Contract | None = None
    contract_problem: str = ""  # why the contract it sent was dropped
    schema: ForwardSchema | None = None
    graphs: Graphs | None = None


@dataclass(frozen=True)
class Heartbeat:
    pid: int | None
    served: int | None = None  # replies since it started, errors included
    model_errors: int | None = None
    rss: int = 0
    signatures: tuple[InputSignature, ...] | None = None  # most served first
    signatures_problem: str = ""
    batches: tuple[tuple[int, int], ...] = ()  # (rows per forward, forwards) since the last


@dataclass(frozen=True)
class ContractReport:
    """A contract learned from traffic (the worker probed it after its first request)."""

    pid: int | None
    contract: Contract | None
    problem: str = ""


@dataclass(frozen=True)
class Failed:
    pid: int | None
    stage: str
    reason: str
    traceback: str = ""


@dataclass(frozen=True)
class Bye:
    pid: int | None
    served: int | None = None


@dataclass(frozen=True)
class Malformed:
    """A message not to believe: ``kind`` as sent (if a string) and what was wrong."""

    kind: str
    problem: str
    pid: int | None = None


WorkerEvent = Hello | Phase | Ready | Heartbeat | ContractReport | Failed | Bye | Malformed


class _Bad(Exception):
    pass


def _opt(msg: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``msg[key]`` if it is of ``kind``; None if absent or nil; _Bad otherwise."""
    value = msg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _Bad(f"{key} must be {what}, not a bool")
    if not isinstance(value, kind):
        raise _Bad(f"{key} must be {what}, not {type(value).__name__}")
    return value


def _count(msg: Mapping[str, Any], key: str) -> int | None:
    value = _opt(msg, key, int, "an integer")
    if value is not None and value < 0:
        raise _Bad(f"{key} must not be negative")
    return value


def _seconds(msg: Mapping[str, Any], key: str) -> float | None:
    value = _opt(msg, key, (int, float), "a number")
    return None if value is None else float(value)


def _text(msg: Mapping[str, Any], key: str, required: bool = False) -> str:
    value = _opt(msg, key, str, "a string")
    if value is None and required:
        raise _Bad(f"{key} is missing")
    return value or ""


def _pid(msg: Mapping[str, Any]) -> int | None:
    pid = _count(msg, "pid")
    return pid if pid else None


# What the typed parsers of pool.contract raise on a value of the wrong shape.
_UNPARSED = (ContractError, ValueError, TypeError, KeyError, AttributeError)


def _contract(value: Any) -> tuple[Contract | None, str]:
    if value is None:
        return None, ""
    try:
        return Contract.from_json(value), ""
    except _UNPARSED as exc:
        return None, str(exc) or type(exc).__name__


def _timings(msg: Mapping[str, Any]) -> dict[str, float]:
    raw = _opt(msg, "timings", dict, "a map")
    out: dict[str, float] = {}
    for k, v in (raw or {}).items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float):
            raise _Bad(f"timings must map names to seconds, not {k!r}: {v!r}")
        out[k] = float(v)
    return out


def _graphs(msg: Mapping[str, Any]) -> Graphs | None:
    raw = _opt(msg, "graphs", dict, "a map")
    if raw is None:
        return None
    sizes, skipped = raw.get("sizes") or [], raw.get("skipped") or []
    if not isinstance(sizes, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in sizes
    ):
        raise _Bad("graphs.sizes must be a list of integers")
    if not isinstance(skipped, list):
        raise _Bad("graphs.skipped must be a list")
    return Graphs(tuple(sizes), tuple(str(s) for s in skipped[:8]))


def _batches(msg: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    raw = _opt(msg, "batches", list, "a list")
    out: list[tuple[int, int]] = []
    for pair in (raw or [])[:MAX_BATCH_PAIRS]:
        ok = isinstance(pair, list) and len(pair) == 2
        if ok and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in pair):
            out.append((pair[0], pair[1]))
        else:
            raise _Bad(f"batches must be [rows, forwards] pairs of positive integers, not {pair!r}")
    return tuple(out)


def _signatures(msg: Mapping[str, Any]) -> tuple[tuple[InputSignature, ...] | None, str]:
    raw = _opt(msg, "signatures", list, "a list")
    if not raw:
        return None, ""
    try:
        return tuple(InputSignature.from_wire(v) for v in raw[:MAX_EXAMPLES]), ""
    except _UNPARSED as exc:
        return None, str(exc) or type(exc).__name__


def _schema(value: Any) -> ForwardSchema | None:
    """A forward schema only labels a contract not known yet: a bad one is dropped."""
    try:
        return ForwardSchema.from_wire(value) if value is not None else None
    except _UNPARSED:
        return None


def _decode(kind: str, msg: Mapping[str, Any]) -> WorkerEvent:
    pid = _pid(msg)
    if kind == "hello":
        return Hello(pid, _text(msg, "model"), _text(msg, "version"), _text(msg, "device"))
    if kind == "phase":
        name = _text(msg, "phase", required=True)
        try:
            phase = PhaseName(name)
        except ValueError:
            raise _Bad(f"unknown phase {name[:40]!r}") from None
        done, total = _count(msg, "bytes"), _count(msg, "total")
        return Phase(pid, phase, done, total, _seconds(msg, "staged_s"))
    if kind == "ready":
        contract, problem = _contract(msg.get("contract"))
        return Ready(
            pid,
            timings=_timings(msg),
            sent_at=_seconds(msg, "sent_at"),
            rss=_count(msg, "rss") or 0,
            heap_frozen=_count(msg, "heap_frozen") or 0,
            sandbox=_opt(msg, "sandbox", dict, "a map"),
            contract=contract,
            contract_problem=problem,
            schema=_schema(msg.get("schema")),
            graphs=_graphs(msg),
        )
    if kind == "hb":
        signatures, problem = _signatures(msg)
        return Heartbeat(
            pid,
            served=_count(msg, "served"),
            model_errors=_count(msg, "model_errors"),
            rss=_count(msg, "rss") or 0,
            signatures=signatures,
            signatures_problem=problem,
            batches=_batches(msg),
        )
    if kind == "contract":
        contract, problem = _contract(msg.get("contract"))
        return ContractReport(pid, contract, problem)
    if kind == "failed":
        return Failed(
            pid,
            _text(msg, "stage", required=True),
            _text(msg, "reason", required=True)[:MAX_REASON],
            _text(msg, "traceback")[-MAX_TRACEBACK:],
        )
    if kind == "bye":
        return Bye(pid, _count(msg, "served"))
    raise _Bad(f"unknown kind {kind[:40]!r}")


def decode(msg: Mapping[str, Any]) -> WorkerEvent:
    """The record for one decoded event map; ``Malformed`` (never an exception) when
    the map does not say what a worker says."""
    kind = msg.get("t")
    if not isinstance(kind, str):
        return Malformed("", "no kind (t)")
    try:
        return _decode(kind, msg)
    except _Bad as bad:
        try:
            pid = _pid(msg)
        except _Bad:
            pid = None
        return Malformed(kind[:40], str(bad)[:300], pid)
