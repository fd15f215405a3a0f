"""A standby's preload: the serving version read into host memory before it is needed.

poold names, in the standby's spec, the version serving on its device (``pool.preload``
decides when). Once its device is up the standby applies the sandbox that version's
workers get (a model is code from its first byte on, so the read waits for it), reads
the model as a drain-first upgrade stages one (``workers.staged``: TorchScript and
torch.export loaded onto the CPU with their tensors pinned, safetensors' data region in
one pinned buffer), and says "preloaded". A take for the same model, version and file
then costs the copy to the device and the warm-up; ``torch.jit.load`` (0.7 s for
768 MiB) is off the path of a crash replacement and of a spawn.

A take for anything else (another version: an upgrade) drops the preload and loads as
before, in the same confined process: poold only hands a preloaded standby a path its
sandbox can read (``pool.preload.PreloadSpec.readable``).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers.loader import describe_error
from workers.main import WorkerSpec
from workers.sandbox import SandboxReport, confine
from workers.staged import StagedModel, stage_model

log = logging.getLogger(__name__)


def file_id(path: str) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of ``path``: a file replaced or rewritten since the preload
    is not the one preloaded."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class Preloaded:
    """What a standby holds for the worker it becomes (``workers.serve.Worker``). The read
    runs on a thread of its own (``start``), so that a take for another version need not
    wait for it; a take for this version waits for it to finish."""

    model: str
    version: str
    path: str
    file: tuple[int, int, int] | None
    sandbox: SandboxReport | None = None  # applied by the standby; None: not asked or refused
    staged: StagedModel | None = None  # None: not read (yet), or the read failed
    load_s: float = 0.0
    manifest: Any = None
    abandoned: bool = False  # taken for something else: the reading thread drops its copy
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None

    def start(self, pin: bool, report: Callable[[dict[str, Any]], None]) -> None:
        self.thread = threading.Thread(
            target=self._read, args=(pin, report), name="preload", daemon=True
        )
        self.thread.start()

    def _read(self, pin: bool, report: Callable[[dict[str, Any]], None]) -> None:
        msg: dict[str, Any] = {"t": "preloaded", "ok": False}
        t0 = time.monotonic()
        try:
            staged: StagedModel | None = stage_model(self.path, self.manifest, pin=pin)
        except Exception as exc:  # the worker it becomes loads on its own, and fails there
            staged = None
            msg["reason"] = describe_error(exc)
            log.warning("standby preload of %s v%s: %s", self.model, self.version, msg["reason"])
        else:
            self.load_s = time.monotonic() - t0
            msg.update(
                ok=True, load_s=round(self.load_s, 4), bytes=self.file[1] if self.file else 0
            )
        with self.lock:
            if not self.abandoned:
                self.staged = staged
                staged = None
        if staged is not None:  # a take for another version came first
            _drop(staged)
        report(msg)

    def take(self, spec: WorkerSpec) -> StagedModel | None:
        """The staged model when ``spec`` is the version preloaded (same model, version,
        path and file; waits for a read still running); else None, and the host copy is
        dropped (or will be, by its thread) before the worker loads its own."""
        same = (spec.model, spec.version, spec.path) == (self.model, self.version, self.path)
        if same and file_id(spec.path) == self.file:
            if self.thread is not None:
                self.thread.join()
            staged, self.staged = self.staged, None
            return staged
        with self.lock:
            self.abandoned = True
            staged, self.staged = self.staged, None
        log.info("worker %s: preload of %s v%s not used", spec.wid, self.model, self.version)
        if staged is not None:
            _drop(staged)
        return None


def _drop(staged: StagedModel) -> None:
    staged.release()
    del staged
    gc.collect()


def preload(
    request: dict[str, Any], device: str, report: Callable[[dict[str, Any]], None]
) -> Preloaded:
    """In a standby whose device is up: confine (on this thread: Landlock below ABI 8
    holds the thread that applies it and those it starts later), then read
    ``request``'s model on a thread; ``report`` gets the "preloaded" message for poold
    (``ok``, ``bytes``, ``load_s``, or ``reason``) from that thread."""
    from workers.manifest import load_manifest

    path = str(request.get("path", ""))
    pre = Preloaded(str(request.get("model", "")), str(request.get("version", "")), path, None)
    roots = [r for r in request.get("model_roots", []) if isinstance(r, str)]
    key = request.get("key")
    try:
        sandbox = request.get("sandbox")
        pre.sandbox = confine(sandbox if isinstance(sandbox, dict) else {}, roots, path, device)
        pre.file = file_id(path)  # after confining: what the worker may read is what counts
        pre.manifest = load_manifest(path, roots or None)
    except Exception as exc:
        reason = describe_error(exc)
        log.warning("standby preload of %s v%s: %s", pre.model, pre.version, reason)
        pre.abandoned = True
        report({"t": "preloaded", "key": key, "ok": False, "reason": reason})
        return pre
    pre.start(device.startswith("cuda"), lambda msg: report({**msg, "key": key}))
    return pre
