"""One model at run time: its config, route, generations, workers and operation."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count
from typing import Any

from pool.config import ModelConfig
from pool.contract import MAX_EXAMPLES, Contract, ForwardSchema, InputSignature
from pool.flapping import FlapGuard
from pool.lifecycle import IllegalTransition, WorkerRecord, WorkerState
from pool.model_lifecycle import TRANSITIONS, ModelStatus
from pool.state import Deployed, ModelState
from router.table import ModelRoute


@dataclass
class ModelRuntime:
    cfg: ModelConfig
    route: ModelRoute
    state: ModelState
    devices: tuple[str, ...]
    gens: dict[int, Deployed] = field(default_factory=dict)
    serving_gen: int = 0
    workers: list[WorkerRecord] = field(default_factory=list)
    # Where the model is in its lifecycle (pool.model_lifecycle), moved only through its
    # table by the methods below: begin/end an operation, fail/recover, unload, settle.
    lifecycle: ModelStatus = ModelStatus.STARTING
    busy: str | None = None  # the running operation, if any (set by begin)
    failed: str | None = None  # why restarts gave up (set by fail)
    last_failure: str | None = None  # the last worker exit that was not asked for
    flap: FlapGuard = field(default_factory=FlapGuard)
    restarts: list[tuple[float, int]] = field(default_factory=list)  # (when, slot)
    # What the serving generation was sent, most served first (for the next warm-up).
    signatures: list[InputSignature] = field(default_factory=list)
    contracts: dict[int, Contract] = field(default_factory=dict)  # generation -> contract
    # generation -> forward()'s schema as its file states it (shown while no contract)
    schemas: dict[int, ForwardSchema] = field(default_factory=dict)
    gen_counter: count[int] = field(default_factory=lambda: count(1))

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def deployed(self) -> Deployed | None:
        return self.gens.get(self.serving_gen)

    @property
    def contract(self) -> Contract | None:
        """The serving version's contract, once a worker of it has reported one."""
        return self.contracts.get(self.serving_gen)

    def note_schema(self, generation: int, schema: ForwardSchema | None) -> None:
        """A ready worker's forward schema (decoded by ``pool.worker_wire``, which drops
        a malformed one: it only labels a contract not known yet)."""
        if schema is not None and generation in self.gens:
            self.schemas[generation] = schema

    def forget(self, generation: int) -> None:
        """Drop a generation nothing runs any more, with what was learned of it."""
        self.gens.pop(generation, None)
        self.contracts.pop(generation, None)
        self.schemas.pop(generation, None)

    def contract_record(self, deployed: Deployed) -> dict[str, Any]:
        """``deployed``'s inputs and outputs for its history entry, when known."""
        gens = [g for g, d in self.gens.items() if d == deployed]
        contract = self.contracts.get(max(gens)) if gens else None
        if contract is None:
            return {}
        return {
            "inputs": [t.to_json() for t in contract.inputs],
            "outputs": [t.to_json() for t in contract.outputs],
            "batchable": contract.batchable,
        }

    def warmup_signatures(self) -> list[InputSignature]:
        """Inputs a new worker warms up on: what the serving version was sent, then the
        examples of its contract (known also after a restart, before any traffic)."""
        out: list[InputSignature] = []
        contract = self.contract
        for sig in [*self.signatures, *(contract.examples if contract else ())]:
            if sig not in out and len(out) < MAX_EXAMPLES:
                out.append(sig)
        return out

    def alive(self, generation: int | None = None) -> list[WorkerRecord]:
        return [
            w
            for w in self.workers
            if w.alive and (generation is None or w.generation == generation)
        ]

    # ---------------------------------------------------------------- lifecycle
    def status(self) -> ModelStatus:
        return self.lifecycle

    @property
    def removing(self) -> bool:
        """Being unloaded: drained, then forgotten (pool.manage)."""
        return self.lifecycle is ModelStatus.UNLOADING

    def move(self, new: ModelStatus) -> None:
        if new is self.lifecycle:
            return
        if new not in TRANSITIONS[self.lifecycle]:
            raise IllegalTransition(f"model {self.name}: {self.lifecycle.value} -> {new.value}")
        self.lifecycle = new

    def begin(self, operation: str) -> None:
        """An operation starts (upgrade, rollback, recycle, scale, load, unload). A failed
        model stays FAILED until the operation recovers it (an upgrade or rollback)."""
        self.busy = operation
        if self.lifecycle is not ModelStatus.FAILED:
            self.move(ModelStatus.UPGRADING)

    def end(self) -> None:
        self.busy = None
        self.settle()

    def fail(self, why: str) -> None:
        """Restarts gave up: requests are answered MODEL_UNAVAILABLE until recovered."""
        self.failed = why
        self.move(ModelStatus.FAILED)

    def recover(self) -> None:
        """An upgrade or rollback (running: ``begin`` came first) clears a failure."""
        self.failed = None
        self.move(ModelStatus.UPGRADING if self.busy else ModelStatus.STARTING)

    def unload(self) -> None:
        self.move(ModelStatus.UNLOADING)

    def settle(self) -> None:
        """Between operations, after the workers changed: SERVING while a worker of the
        serving generation is ready, else STARTING. Failed and unloading stay."""
        if self.busy is not None or self.lifecycle in (ModelStatus.FAILED, ModelStatus.UNLOADING):
            return
        ready = any(
            w.state is WorkerState.READY and w.generation == self.serving_gen for w in self.workers
        )
        self.move(ModelStatus.SERVING if ready else ModelStatus.STARTING)
