"""Worker messages decoded once, one record per kind (pool.worker_wire), and what the core
does with a malformed one: nothing, said in the log.

The maps are the ones ``workers.serve.Worker.event`` sends, through msgpack and the
router's own decoder (``router.protocol.unpack_map``), so the wire is the real one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgpack
import pytest
from corekit import NO_SUCH_PID, Core, only

from pool.commands import Activate, ObserveBatch
from pool.contract import Contract, ForwardSchema, InputSignature, TensorSpec
from pool.lifecycle import WorkerState
from pool.worker_wire import (
    Bye,
    ContractReport,
    Failed,
    Graphs,
    Heartbeat,
    Hello,
    Malformed,
    Phase,
    PhaseName,
    Ready,
    decode,
)
from router.protocol import unpack_map

PID = 4242
SIG = InputSignature.of([("float32", (2, 16))])
CONTRACT = Contract(
    (TensorSpec("x", "float32", (-1, 16), 0),),
    (TensorSpec("output0", "float32", (-1, 4), 0),),
    True,
    (SIG,),
)
SCHEMA = ForwardSchema((("x", "Tensor"),), "Tensor")


def wire(kind: str, **fields: Any) -> Any:
    """``fields`` as a worker sends them: packed by msgpack, read as the router reads."""
    event = {"t": kind, "pid": PID, "wid": "m.g1.s0.w1", **fields}
    return decode(unpack_map(msgpack.packb(event)))


def test_every_kind_a_worker_sends_decodes_to_its_record() -> None:
    assert wire("hello", model="m", version="1", device="cpu") == Hello(PID, "m", "1", "cpu")
    assert wire("phase", phase="loading", bytes=10, total=100) == Phase(
        PID, PhaseName.LOADING, 10, 100
    )
    assert wire("phase", phase="staged", staged_s=0.25) == Phase(
        PID, PhaseName.STAGED, staged_s=0.25
    )
    assert wire("phase", phase="warming").phase is PhaseName.WARMING
    ready = wire(
        "ready",
        timings={"load_s": 0.5, "warm_s": 1},
        heap_frozen=170_000,
        rss=1 << 28,
        torch_reserved=0,
        num_inputs=1,
        graphs={"signatures": 1, "sizes": [1, 2, 4], "batchable": True, "skipped": ["x"]},
        standby=False,
        sandbox={"applied": True, "fs": True, "landlock_abi": 6, "net": "denied"},
        contract=CONTRACT.to_json(),
        schema=SCHEMA.to_wire(),
        sent_at=12.5,
    )
    assert isinstance(ready, Ready)
    assert ready.timings == {"load_s": 0.5, "warm_s": 1.0} and ready.sent_at == 12.5
    assert (ready.rss, ready.heap_frozen) == (1 << 28, 170_000)
    assert ready.contract == CONTRACT and ready.schema == SCHEMA and not ready.contract_problem
    assert ready.graphs == Graphs((1, 2, 4), ("x",))
    assert ready.sandbox is not None and ready.sandbox["landlock_abi"] == 6
    hb = wire(
        "hb",
        served=7,
        model_errors=1,
        rss=1 << 27,
        signatures=[SIG.to_wire()],
        batches=[[4, 2], [1, 3]],
    )
    assert hb == Heartbeat(PID, 7, 1, 1 << 27, (SIG,), "", ((4, 2), (1, 3)))
    assert wire("contract", contract=CONTRACT.to_json()) == ContractReport(PID, CONTRACT)
    assert wire("failed", stage="load", reason="bad file") == Failed(PID, "load", "bad file")
    assert wire("bye", served=3) == Bye(PID, 3)
    assert wire("hb") == Heartbeat(PID)  # every field but the kind may be left out


@pytest.mark.parametrize(
    "kind,fields,problem",
    [
        ("hb", {"rss": "lots"}, "rss must be an integer, not str"),
        ("hb", {"served": -1}, "served must not be negative"),
        ("hb", {"batches": [[4, 0]]}, "batches must be [rows, forwards] pairs"),
        ("hb", {"batches": {"4": 2}}, "batches must be a list"),
        ("ready", {"timings": {"load_s": "slow"}}, "timings must map names to seconds"),
        ("ready", {"sandbox": "yes"}, "sandbox must be a map"),
        ("ready", {"graphs": {"sizes": ["a"]}}, "graphs.sizes must be a list of integers"),
        ("phase", {}, "phase is missing"),
        ("phase", {"phase": "dancing"}, "unknown phase 'dancing'"),
        ("phase", {"phase": "loading", "bytes": True}, "bytes must be an integer, not a bool"),
        ("failed", {"reason": "x"}, "stage is missing"),
        ("failed", {"stage": "load", "reason": ["x"]}, "reason must be a string"),
        ("shout", {}, "unknown kind 'shout'"),
    ],
)
def test_a_field_of_the_wrong_type_makes_the_message_malformed(
    kind: str, fields: dict[str, Any], problem: str
) -> None:
    got = wire(kind, **fields)
    assert isinstance(got, Malformed) and got.kind == kind and got.pid == PID, got
    assert got.problem.startswith(problem), got.problem


def test_no_kind_or_a_bad_pid_is_malformed_and_unknown_keys_are_ignored() -> None:
    assert decode({"pid": 1}) == Malformed("", "no kind (t)")
    assert decode({"t": 7}) == Malformed("", "no kind (t)")
    bad_pid = decode({"t": "hello", "pid": "me"})
    assert isinstance(bad_pid, Malformed) and bad_pid.pid is None
    assert wire("hello", future_key={"any": "thing"}) == Hello(PID)


def test_a_bad_contract_or_signature_is_dropped_and_the_message_stands() -> None:
    ready = wire("ready", timings={}, contract={"batchable": "maybe"})
    assert isinstance(ready, Ready) and ready.contract is None
    assert "batchable" in ready.contract_problem
    hb = wire("hb", served=2, model_errors=0, signatures=[{"inputs": 3}])
    assert isinstance(hb, Heartbeat) and hb.signatures is None and hb.served == 2
    assert hb.signatures_problem
    assert wire("ready", schema={"inputs": 1}).schema is None  # type: ignore[union-attr]


def booted(tmp_path: Path) -> tuple[Core, Any]:
    core = Core(tmp_path)
    return core, core.boot(pid=NO_SUCH_PID)


def test_a_malformed_heartbeat_changes_nothing_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before the records, ``int("lots")`` raised ValueError out of Supervisor.handle.
    core, rec = booted(tmp_path)
    core.says(rec, t="hb", rss=1 << 20, served=4, model_errors=0)
    seen = (rec.rss, rec.answered, rec.last_heartbeat)
    core.now += 1.0
    with caplog.at_level(logging.ERROR, logger="pool.supervisor"):
        cmds = core.says(rec, t="hb", rss="lots", served=9, batches=[[1, 1]])
    assert cmds == [] and not only(cmds, ObserveBatch)
    assert (rec.rss, rec.answered, rec.last_heartbeat) == seen  # not believed, not a beat
    assert rec.malformed == 1 and rec.state is WorkerState.READY
    (line,) = [r.getMessage() for r in caplog.records]
    assert "sent a malformed hb message (1 so far): rss must be an integer" in line
    for _ in range(50):
        core.says(rec, t="hb", rss="lots")
    assert rec.malformed == 51 and len(caplog.records) == 3  # bounded: the first three


def test_a_malformed_ready_does_not_route_the_worker(tmp_path: Path) -> None:
    core = Core(tmp_path)
    rec = core.newest()
    core.spawned(rec)
    core.says(rec, t="hello", pid=NO_SUCH_PID)
    cmds = core.says(rec, t="ready", timings={"load_s": "soon"})
    assert rec.state is WorkerState.LOADING and not only(cmds, Activate)
    cmds = core.says(rec, t="ready", timings={"load_s": 0.2})
    assert rec.state is WorkerState.READY and only(cmds, Activate)


def test_a_ready_with_a_bad_contract_still_serves_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    core = Core(tmp_path)
    rec = core.newest()
    core.spawned(rec)
    with caplog.at_level(logging.WARNING, logger="pool.supervisor"):
        core.says(rec, t="ready", timings={}, contract={"batchable": 1})
    assert rec.state is WorkerState.READY and rec.generation not in core.rt.contracts
    assert any("sent a bad contract" in r.getMessage() for r in caplog.records)
    core.says(rec, t="contract", contract=CONTRACT.to_json())
    assert core.rt.contracts[rec.generation] == CONTRACT
