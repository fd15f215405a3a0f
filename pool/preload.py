"""Which version a device's standby preloads, and whether the host has the memory for it.

A standby with a preload (``workers.preload``) holds the serving version of its
device's model in host memory, read and sandboxed ahead of need, so that a crash
replacement, a recycle or a spawn of that version only copies it to the device and warms
up. Its cost is host RAM: one copy of the model per standby (TorchScript's tensors and
safetensors' data region pinned on a GPU host). ``standby_preload`` (pool and model):

- ``false``: no preload; a standby holds a device and nothing else.
- ``true``: always.
- ``"auto"`` (default): when the model file is at most ``RAM_SHARE`` of the host's
  available memory (``MemAvailable``) as the standby is forked.

Only a device with exactly one model that takes its standby gets a preload (with
several, which one the next take is for cannot be known). A preload is in step with the
serving version: once the device is idle, a standby whose preload is no longer the
serving version (an upgrade that did not take it, a rollback) is let go and a fresh one
forked, which preloads the new version. A preloaded standby is confined to the pool's
model roots and the preload's directory; it is taken only for a path it can read there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pool.config import ModelConfig, PoolConfig
    from pool.ports import HostFiles

RAM_SHARE = 0.25  # auto: the file may take at most this share of MemAvailable


def preload_key(model: str, version: str, path: str) -> str:
    """What a preload and a worker spec must share for the take to use the preload."""
    return f"{model}:{version}:{path}"


def preload_setting(pool: PoolConfig, model: ModelConfig) -> str | bool:
    """``model``'s standby_preload ("auto", True or False), the pool's unless it has one."""
    return pool.standby_preload if model.standby_preload is None else model.standby_preload


class PreloadState(StrEnum):
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"  # the standby still serves as one without a preload


@dataclass(frozen=True)
class PreloadSpec:
    """The version a standby is to preload, and the sandbox its workers get."""

    model: str
    version: str
    path: str
    setting: str | bool  # the model's standby_preload: "auto" or True
    sandbox_mode: str | bool
    roots: tuple[str, ...]
    run_root: str  # the standby's run directory goes here (named after it)

    @property
    def key(self) -> str:
        return preload_key(self.model, self.version, self.path)

    def readable(self, path: str, files: HostFiles) -> bool:
        """Whether a standby confined for this preload can read ``path``: inside one of
        the roots or the preload's own directory (``workers.sandbox.confine``); any
        path with ``sandbox = false``."""
        if self.sandbox_mode is False:
            return True
        real = files.realpath(path)
        dirs = [*self.roots, os.path.dirname(os.path.abspath(self.path))]
        for d in dirs:
            top = files.realpath(d)
            if os.path.commonpath([top, real]) == top:
                return True
        return False

    def to_wire(self, run_dir: str) -> dict[str, Any]:
        return {
            "key": self.key,
            "model": self.model,
            "version": self.version,
            "path": self.path,
            "model_roots": list(self.roots),
            "sandbox": {"mode": self.sandbox_mode, "run_dir": run_dir},
        }


@dataclass
class PreloadRecord:
    """A standby's preload, as poold knows it."""

    spec: PreloadSpec
    run_dir: str
    state: PreloadState = PreloadState.LOADING
    bytes: int = 0
    load_s: float | None = None
    reason: str = ""
    since: float = 0.0  # the core's clock when it was asked for

    def on_report(self, msg: dict[str, Any]) -> None:
        if msg.get("key") != self.spec.key or self.state is not PreloadState.LOADING:
            return
        if msg.get("ok"):
            self.state = PreloadState.LOADED
            self.bytes = int(msg.get("bytes") or 0)
            load_s = msg.get("load_s")
            self.load_s = float(load_s) if isinstance(load_s, int | float) else None
        else:
            self.state = PreloadState.FAILED
            self.reason = str(msg.get("reason") or "")[:600]

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.spec.model,
            "version": self.spec.version,
            "state": self.state.value,
            "bytes": self.bytes,
            "load_s": None if self.load_s is None else round(self.load_s, 3),
            "reason": self.reason,
        }


def admit(spec: PreloadSpec, files: HostFiles) -> tuple[bool, str]:
    """Whether to preload ``spec`` now, and why not: ``true`` always (if the file is
    there), ``"auto"`` when the file fits in ``RAM_SHARE`` of available memory."""
    try:
        size = files.size(spec.path)
    except OSError as exc:
        return False, f"cannot read {spec.path}: {exc.strerror or exc}"
    if spec.setting is True:
        return True, ""
    ram = files.mem_available()
    if ram is None:
        return False, "auto: the host's available memory is unknown"
    if size > RAM_SHARE * ram:
        return False, (
            f"auto: {size >> 20} MiB is more than {RAM_SHARE:.0%} of the {ram >> 20} MiB available"
        )
    return True, ""
