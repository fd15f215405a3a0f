"""The supervisor's half of the hot standbys (mixed into ``pool.supervisor.Supervisor``).

Which model takes the device's standby (``standby`` in the config), the news the
spawner sends about standbys and takes, which devices must not get a new standby yet,
and the device memory level without bare CUDA contexts that the retire proof compares
(``pool.standby`` explains why).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pool.commands import Command, SendControl, Taken
from pool.config import sandbox_mode, standby_wanted
from pool.device_memory import device_level
from pool.lifecycle import WorkerRecord, WorkerState
from pool.preload import PreloadSpec, preload_key, preload_setting
from pool.runtime import ModelRuntime
from pool.standby import Standbys

if TYPE_CHECKING:
    from pool.config import PoolConfig
    from pool.ports import Ports


class StandbyUse:
    pool: PoolConfig
    ports: Ports
    models: dict[str, ModelRuntime]
    by_token: dict[int, WorkerRecord]
    standbys: Standbys
    roots: list[str]
    backend: str

    def emit(self, command: Command) -> None:
        raise NotImplementedError

    def takes_standby(self, rt: ModelRuntime, device: str) -> bool:
        return standby_wanted(self.pool, rt.cfg, device)

    def preload_target(self, device: str) -> PreloadSpec | None:
        """The version the standby on ``device`` should hold on the host (pool.preload):
        the serving version of the one model there that takes the standby."""
        takers = [
            rt
            for rt in self.models.values()
            if device in rt.devices and self.takes_standby(rt, device)
        ]
        if len(takers) != 1:
            return None
        rt = takers[0]
        setting = preload_setting(self.pool, rt.cfg)
        dep = rt.deployed
        if setting is False or rt.failed is not None or dep is None:
            return None
        return PreloadSpec(
            model=rt.name,
            version=dep.version,
            path=dep.path,
            setting=setting,
            sandbox_mode=sandbox_mode(self.pool, rt.cfg),
            roots=tuple(self.roots),
            run_root=os.path.join(os.path.dirname(self.backend.removeprefix("ipc://")), "w"),
        )

    def take_standby(self, rt: ModelRuntime, device: str, version: str, path: str) -> Taken | None:
        """The device's standby for a worker of ``rt`` at ``version`` (``path``)."""
        return self.standbys.take(device, path, preload_key(rt.name, version, path))

    def release(self, rec: WorkerRecord) -> None:
        """A held worker may now put its staged weights on the device."""
        rec.holding = False
        self.emit(SendControl(rec.slot_view.wid, {"t": "go"}))

    def context_pids(self, device: str) -> set[int]:
        """Processes on ``device`` holding a CUDA context and no model (pool.standby)."""
        held = {
            w.pid
            for rt in self.models.values()
            for w in rt.workers
            if w.holding and w.alive and w.device == device and w.pid is not None
        }
        return self.standbys.pids(device) | held

    def device_level(self, device: str) -> int | None:
        """Used device memory, bare contexts left out (see pool.standby): a call through
        the DeviceMemory port (NVML in poold), read synchronously by a spawn for the
        retire proof's reference and by the operations' memory waits."""
        return device_level(self.ports.memory, device, self.context_pids(device))

    def on_spawner_message(self, msg: dict[str, Any]) -> None:
        if msg.get("t") == "standby_ready":
            self.standbys.on_ready(msg)
        elif msg.get("t") == "preloaded":
            self.standbys.on_preloaded(msg)
        elif msg.get("t") == "took":
            pid, used = int(msg.get("pid") or 0), bool(msg.get("standby"))
            self.standbys.took(pid, used)
            rec = self.by_token.get(int(msg.get("token") or 0))
            if rec is not None:
                rec.from_standby = used

    def busy_devices(self) -> set[str]:
        """Devices where a standby must not be forked now: something boots there, or an
        operation of a model there runs (see pool.standby)."""
        busy: set[str] = set()
        for rt in self.models.values():
            if rt.busy is not None:
                busy.update(rt.devices)
            busy.update(w.device for w in rt.workers if w.booting or w.state is WorkerState.FAILED)
        return busy

    def _schedule_restart(self, rt: ModelRuntime, slot: int, why: str) -> None:
        """As WorkerExits does it, but the first failure in the flapping window takes
        the waiting standby at once, here, as the exit is reported: its back-off (0.5 s)
        and even the wait for the next tick (up to 50 ms) would be a large part of a
        standby replacement's time. Later failures keep the growing back-off."""
        super()._schedule_restart(rt, slot, why)  # type: ignore[misc]
        device = rt.devices[slot]
        if (
            len(rt.flap.failures) == 1
            and rt.restarts
            and rt.restarts[-1][1] == slot
            and rt.busy is None
            and rt.failed is None
            and self.takes_standby(rt, device)
            and self.standbys.waiting(device) is not None
        ):
            rt.restarts.pop()
            if not any(w.slot == slot and w.generation == rt.serving_gen for w in rt.alive()):
                self.spawn(rt, rt.serving_gen, slot)  # type: ignore[attr-defined]

    def on_exited(self, pid: int, status: int) -> None:
        """A standby's exit is the standbys' business; any other goes on to WorkerExits."""
        if not self.standbys.on_exited(pid, status):
            super().on_exited(pid, status)  # type: ignore[misc]
            self.standbys.worker_exited(pid)
