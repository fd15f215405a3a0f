"""The worker's sandbox: a model is code, so a worker keeps only what serving needs.

Applied once per worker process, after CUDA is up and before the model is loaded (a
pickled model runs code as it loads), in this order:

1. ``PR_SET_NO_NEW_PRIVS``: no execve gains privileges again.
2. Landlock (``workers.landlock``): read-only access to the model roots, the Python
   and torch installation and the system libraries; read-write to the worker's own
   run directory; devices a GPU needs; nothing else. Where the kernel has ABI 4, no
   TCP bind or connect; ABI 6, no abstract unix socket or signal outside the domain.
3. seccomp (``workers.seccomp``), on every thread: only unix sockets can be created.

The worker keeps its connections to poold: they are unix sockets with a path (the
backend, the lane), which Landlock (up to ABI 8) and the filter leave alone, and
libzmq reconnects from its own I/O thread. Later versions load in new processes, and a
standby is sandboxed when it is taken, so one worker only ever reads one model root.

``apply`` returns a ``SandboxReport``: what was applied, or why not. With ``required``
(``sandbox = true``) a worker whose kernel cannot confine its files refuses to serve.
"""

from __future__ import annotations

import glob
import logging
import os
import site
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from workers import landlock, seccomp
from workers.landlock import DEVICE, READ, WRITE, Grant

log = logging.getLogger(__name__)

# System files a worker reads after it is sandboxed: shared libraries (dlopen by name
# reads ld.so.cache), time zones for log lines, entropy, and CPU topology for thread
# pools started later. /proc/self resolves to this process's own directory only:
# other processes' environments stay out of reach.
SYSTEM_READ = (
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/sys/devices/system/cpu",
    "/sys/fs/cgroup",
)
DEVICES_RW = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
# A CUDA context is created before the sandbox; these cover what the driver opens
# later (new device files, PCI topology for NVML-style queries).
GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps/*")
GPU_READ = ("/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices", "/dev/nvidia-caps")


class SandboxError(Exception):
    """``sandbox = true`` and the kernel cannot apply it."""


@dataclass(frozen=True)
class SandboxPolicy:
    """What one worker may reach: read-only trees, read-write trees, device files."""

    read: tuple[str, ...]
    write: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()

    def grants(self) -> list[Grant]:
        out = [Grant(p, READ) for p in self.read]
        out += [Grant(p, WRITE) for p in self.write]
        out += [Grant(p, DEVICE) for p in self.devices]
        return out


@dataclass
class SandboxReport:
    """What ``apply`` did. ``applied``: at least the files are confined."""

    mode: str  # "auto" | "true" | "false", as configured
    applied: bool = False
    landlock_abi: int = 0  # the kernel's (0: none)
    fs: bool = False  # files confined to the policy
    net: str = "open"  # "denied" (seccomp, every thread), "tcp-denied" (Landlock only)
    scoped: list[str] = field(default_factory=list)  # "abstract-unix", "signal"
    seccomp: bool = False
    # Landlock holds every thread (ABI 8), or only the main thread and those it starts.
    threads: str = "main"
    no_new_privs: bool = False
    rules: int = 0  # paths granted
    missing: list[str] = field(default_factory=list)  # policy paths that do not exist
    reason: str = ""  # why something was not applied

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if not self.applied:
            return f"off ({self.reason})" if self.reason else "off"
        parts = [f"landlock abi {self.landlock_abi}", f"{self.rules} rules", f"net {self.net}"]
        if self.scoped:
            parts.append("scoped " + "+".join(self.scoped))
        if self.reason:
            parts.append(self.reason)
        return ", ".join(parts)


def python_paths() -> list[str]:
    """The interpreter's library trees and the site-packages torch and we live in."""
    paths: list[str] = []
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        value = sysconfig.get_paths().get(name)
        if value:
            paths.append(value)
    paths += site.getsitepackages()
    user = site.getusersitepackages()
    if isinstance(user, str):
        paths.append(user)
    for mod in ("workers", "router", "pool"):  # an editable install lives elsewhere
        spec = sys.modules.get(mod)
        location = getattr(spec, "__file__", None) if spec else None
        if location:
            paths.append(os.path.dirname(location))
    return paths


def worker_policy(model_roots: Sequence[str], run_dir: str, device: str) -> SandboxPolicy:
    """The policy of a worker serving from ``model_roots`` on ``device``."""
    read = [*model_roots, *python_paths(), *SYSTEM_READ, f"/proc/{os.getpid()}"]
    devices = list(DEVICES_RW)
    if device.startswith("cuda"):
        read += GPU_READ
        devices += [p for pattern in GPU_DEVICES for p in sorted(glob.glob(pattern))]
    return SandboxPolicy(tuple(_unique(read)), (run_dir,), tuple(_unique(devices)))


def _unique(paths: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(os.path.realpath(p) for p in paths if p))


def mode_word(mode: str | bool) -> str:
    return "auto" if mode == "auto" else "true" if mode else "false"


def apply(policy: SandboxPolicy, mode: str | bool = "auto") -> SandboxReport:
    """Sandbox this process (see the module docstring). ``mode`` False: nothing;
    "auto": what the kernel offers; True: raise SandboxError unless files are confined
    and new network connections impossible. Irreversible."""
    report = SandboxReport(mode_word(mode))
    if mode is False or mode == "false":
        report.reason = "sandbox = false"
        return report
    required = mode is True
    abi, why = landlock.abi_version()
    report.landlock_abi = abi
    reasons: list[str] = []
    try:
        landlock.set_no_new_privs()
        report.no_new_privs = True
    except OSError as exc:
        reasons.append(str(exc))
    if abi >= 1 and report.no_new_privs:
        try:
            done = landlock.restrict(abi, policy.grants())
            report.fs = True
            report.rules = len(done.granted)
            report.missing = done.missing
            report.net = "tcp-denied" if done.net else "open"
            report.threads = "all" if done.all_threads else "main"
            report.scoped = [
                name
                for bit, name in (
                    (landlock.SCOPE_ABSTRACT_UNIX_SOCKET, "abstract-unix"),
                    (landlock.SCOPE_SIGNAL, "signal"),
                )
                if done.scoped & bit
            ]
        except OSError as exc:
            reasons.append(f"landlock: {exc}")
    elif abi == 0:
        reasons.append(why)
    if report.no_new_privs:
        try:
            seccomp.deny_network()
            report.seccomp = True
            report.net = "denied"
        except OSError as exc:
            reasons.append(str(exc))
    report.applied = report.fs or report.seccomp
    report.reason = "; ".join(reasons)
    if required and not (report.fs and report.net != "open"):
        raise SandboxError(
            "sandbox = true, but this worker could not be confined: "
            + (report.reason or "no Landlock network rule and no seccomp filter")
        )
    return report


def confine(
    request: dict[str, Any], model_roots: Sequence[str], model_path: str, device: str
) -> SandboxReport:
    """Apply what poold asked for in a worker spec's ``sandbox`` map: ``mode`` and
    ``run_dir`` (created here: the worker's only writable place, and its TMPDIR), with
    the pool's ``model_roots`` and the model's own directory readable. An empty map
    (nobody asked): nothing."""
    mode = request.get("mode", False)
    if mode is False or not (mode is True or mode == "auto"):
        return SandboxReport("false", reason="sandbox = false" if request else "not requested")
    run_dir = request.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise SandboxError("the worker spec names no run directory")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.environ["TMPDIR"] = run_dir
    tempfile.tempdir = None  # re-read from TMPDIR at the next use
    roots = [r for r in model_roots if isinstance(r, str)]
    roots.append(os.path.dirname(os.path.abspath(model_path)))
    report = apply(worker_policy(roots, run_dir, device), mode)
    if report.applied:
        log.info("worker pid %d sandboxed: %s", os.getpid(), report.summary())
    else:
        log.warning("worker pid %d not sandboxed: %s", os.getpid(), report.reason)
    return report
