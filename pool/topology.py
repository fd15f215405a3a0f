"""What ``pool-ctl load/unload/scale`` changed, kept in ``<state_dir>/topology.json``.

The config file says which models the pool starts with; runtime commands change that
without editing it. Each change is written atomically (like a committed version), so a
restarted poold comes back to the pool the operator left, not the one the file names:

    {"models": {"NAME": {"present": true, "path": ..., "version": ..., "devices": [...],
                          "max_batch": N},          # loaded at run time (or rescaled)
                "OTHER": {"present": false}}}       # unloaded at run time

A later edit of the config file that changes a model wins over what was recorded for it
(``forget``): the newer intent applies. Unchanged entries leave the record alone.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

from pool.config import ModelConfig
from pool.state import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Override:
    present: bool
    path: str | None = None
    version: str | None = None
    devices: tuple[str, ...] | None = None
    max_batch: int | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Override:
        devices = d.get("devices")
        return cls(
            present=bool(d.get("present", True)),
            path=d.get("path") if isinstance(d.get("path"), str) else None,
            version=d.get("version") if isinstance(d.get("version"), str) else None,
            devices=tuple(str(x) for x in devices) if isinstance(devices, list) else None,
            max_batch=d.get("max_batch") if isinstance(d.get("max_batch"), int) else None,
        )


class Topology:
    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "topology.json")
        self.models: dict[str, Override] = {}
        try:
            with open(self.path, "rb") as f:
                raw = json.loads(f.read())
            for name, entry in dict(raw.get("models", {})).items():
                self.models[str(name)] = Override.from_json(dict(entry))
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, AttributeError) as exc:
            log.error("%s is unreadable (%s); starting from the config alone", self.path, exc)

    def save(self) -> None:
        out = {
            name: {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(o).items()}
            for name, o in self.models.items()
        }
        write_atomic(self.path, json.dumps({"models": out}, indent=1).encode())

    def loaded(self, cfg: ModelConfig) -> None:
        self.models[cfg.name] = Override(
            True, cfg.path, cfg.version, tuple(cfg.devices), cfg.max_batch
        )
        self.save()

    def unloaded(self, name: str) -> None:
        self.models[name] = Override(False)
        self.save()

    def scaled(self, name: str, devices: tuple[str, ...]) -> None:
        self.models[name] = replace(self.models.get(name, Override(True)), devices=devices)
        self.save()

    def forget(self, name: str) -> None:
        if self.models.pop(name, None) is not None:
            self.save()

    def apply(self, configured: tuple[ModelConfig, ...]) -> list[ModelConfig]:
        """The models to run: the config's, changed by what was recorded at run time."""
        out: list[ModelConfig] = []
        names = set()
        for cfg in configured:
            names.add(cfg.name)
            o = self.models.get(cfg.name)
            if o is None:
                out.append(cfg)
            elif o.present:
                out.append(replace(cfg, devices=o.devices or cfg.devices))
        for name, o in self.models.items():
            if name not in names and o.present and o.path:
                out.append(
                    ModelConfig(
                        name=name,
                        path=o.path,
                        version=o.version,
                        devices=o.devices or (),
                        max_batch=o.max_batch or ModelConfig.max_batch,
                    )
                )
        return out
