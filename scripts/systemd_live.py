#!/usr/bin/env python3
"""Boot the shipped unit under a real systemd (PID 1 of a systemd-nspawn container)
and check what an operator relies on:

  ready       `systemctl start` returns (READY=1) only once the model serves
  status      STATUS= text in `systemctl show`; pool-ctl status as root and as the
              gpu-pool user, with no --control
  reload      `systemctl reload` (SIGHUP) adds a model from the edited config
  watchdog    a frozen poold (SIGSTOP) is killed by the watchdog and restarted, back on
              the version pool-ctl committed last
  degraded    one broken model: READY anyway, STATUS names it, `journalctl -p err`
              shows why
  stop        `systemctl stop` leaves nothing in the unit's cgroup

The container's root is a few files in a temporary directory; /usr is the host's,
bound read-only, and so are this checkout and its installed packages. The unit file is
the shipped one, unchanged; a drop-in (the way the unit says local changes belong)
points ExecStart at this checkout and shortens WatchdogSec to keep the run short.

Needs root, systemd-nspawn (Debian: systemd-container) and a systemd in /usr. Exit 0
when every check passed, 1 when one failed, 77 when this machine cannot run it (the
reason is printed). Run: sudo .venv/bin/python scripts/systemd_live.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "scripts" / "systemd" / "gpu-pool.service"
SKIP = 77
IN_REPO, IN_SITE, IN_MODELS = "/opt/gpu-pool", "/opt/gpu-pool-site", "/srv/models"
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Skip(Exception):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def container_python() -> str:
    """A Python inside the container with this interpreter's ABI.

    The unit's ProtectHome=yes hides /root and /home, where a pyenv or a user's
    interpreter often lives, so the system one of the same version is preferred.
    """
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    system = f"/usr/bin/python{ver}"
    if os.path.exists(system):
        return system
    base = os.path.realpath(sys.base_prefix)
    if base.startswith(("/usr/", "/opt/")):
        return os.path.join(base, "bin", f"python{ver}")
    raise Skip(f"no Python {ver} outside /root and /home to run poold under ProtectHome=yes")


def preflight() -> None:
    if os.geteuid() != 0:
        raise Skip("needs root (systemd-nspawn)")
    if not shutil.which("systemd-nspawn"):
        raise Skip("systemd-nspawn not installed (Debian: apt-get install systemd-container)")
    if not os.path.exists("/usr/lib/systemd/systemd"):
        raise Skip("no systemd in /usr/lib/systemd to boot")
    if not shutil.which("nsenter"):
        raise Skip("nsenter (util-linux) not installed")


class Container:
    def __init__(self, top: Path, python: str) -> None:
        self.top = top
        self.root = top / "root"
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    # ------------------------------------------------------------------ set-up
    def build(self, models: Path) -> None:
        r = self.root
        for d in ("etc/systemd/system/gpu-pool.service.d", "etc/gpu-pool", "proc", "sys", "dev",
                  "run", "tmp", "var/lib", "var/log/journal", "root", "home", "srv/models",
                  "opt/gpu-pool", "opt/gpu-pool-site"):  # fmt: skip
            (r / d).mkdir(parents=True, exist_ok=True)
        for d in ("bin", "sbin", "lib", "lib64"):
            if os.path.exists(f"/usr/{d}"):
                (r / d).symlink_to(f"usr/{d}")
        shutil.copy("/usr/lib/os-release", r / "etc/os-release")
        (r / "etc/machine-id").write_text("")
        (r / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\n"
            "gpu-pool:x:990:990:gpu-pool:/nonexistent:/usr/sbin/nologin\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )
        (r / "etc/group").write_text("root:x:0:\ngpu-pool:x:990:\nnogroup:x:65534:\n")
        shutil.copy(UNIT, r / "etc/systemd/system/gpu-pool.service")  # unchanged
        (r / "etc/systemd/system/gpu-pool.service.d/live-test.conf").write_text(
            "[Service]\n"
            "ExecStart=\n"
            f"ExecStart={self.python} -m pool.poold --config /etc/gpu-pool/pool.toml\n"
            f"Environment=PYTHONPATH={IN_REPO}:{IN_SITE}\n"
            "WatchdogSec=6\n"
        )
        self.models = models

    def boot(self) -> None:
        site = sysconfig.get_paths()["purelib"]
        cmd = [
            "systemd-nspawn", "-q", "-D", str(self.root), "--register=no", "--keep-unit",
            "--private-network", "--bind-ro=/usr", f"--bind-ro={REPO}:{IN_REPO}",
            f"--bind-ro={site}:{IN_SITE}", f"--bind-ro={self.models}:{IN_MODELS}",
            "--boot", "--console=pipe",
        ]  # fmt: skip
        log("booting: " + " ".join(cmd))
        # cgroup v2 inside the container even on a hybrid host: systemd then hears that
        # a unit's cgroup emptied (inotify on cgroup.events); under the legacy hierarchy
        # in a container that notification never comes and every stop runs to its timeout.
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=open(self.top / "console.log", "wb"),  # noqa: SIM115  closed with the proc
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.init_pid = wait(self._find_init, 60, "systemd to start in the container")
        state = wait(self._running, 90, "the container's boot to finish")
        log(f"container systemd [host pid {self.init_pid}] is {state}")

    def _find_init(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited: {(self.top / 'console.log').read_text()}")
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True
        ).stdout.split()
        for pid in out:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                pass
        return 0

    def _running(self) -> str:
        out = self.sh("systemctl is-system-running", check=False).strip()
        return out if out in ("running", "degraded") else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.sh("systemctl poweroff --no-block", check=False)
            self.proc.wait(30)
        except (subprocess.TimeoutExpired, RuntimeError):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    # ---------------------------------------------------------------- commands
    def run(self, args: list[str], check: bool = True, timeout: float = 120) -> str:
        cmd = ["nsenter", "-t", str(self.init_pid), "-a", "--", "env", "-i", PATH, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
        return out.stdout + (out.stderr if not check else "")

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> str:
        return self.run(["sh", "-c", script], check=check, timeout=timeout)

    def ctl(self, *args: str, user: str = "root", check: bool = True) -> str:
        """pool-ctl inside the container, with no --control and a login-like env."""
        py = [f"PYTHONPATH={IN_REPO}:{IN_SITE}", self.python, "-m", "pool.ctl.cli", *args]
        if user == "root":
            return self.run(["env", "HOME=/root", *py], check=check)
        who = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        return self.run([*who, "env", "HOME=/nonexistent", *py], check=check)

    def show(self, prop: str) -> str:
        return self.run(["systemctl", "show", "-p", prop, "--value", "gpu-pool"]).strip()

    def write_config(self, models: list[tuple[str, str, str]]) -> None:
        lines = [
            "[pool]",
            'frontend = "tcp://127.0.0.1:5555"',
            'metrics = ""',
            f'model_roots = ["{IN_MODELS}"]',
            "heartbeat_interval_s = 0.5",
            "drain_timeout_s = 10.0",
        ]
        for name, file, version in models:
            lines += ["", "[[models]]", f'name = "{name}"', f'path = "{IN_MODELS}/{file}"']
            lines += [f'version = "{version}"', 'devices = ["cpu"]']
        (self.root / "etc/gpu-pool/pool.toml").write_text("\n".join(lines) + "\n")

    def journal(self, *args: str) -> str:
        return self.run(["journalctl", "--no-pager", "-o", "cat", "-u", "gpu-pool", *args])


def wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.25)


def make_models(where: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from modelkit import make_corrupt, make_mlp

    make_mlp(str(where / "good-v1.pt"), seed=1)
    make_mlp(str(where / "good-v2.pt"), seed=2)
    make_mlp(str(where / "two.pt"), seed=3)
    make_corrupt(str(where / "broken.pt"))
    for p in where.iterdir():
        p.chmod(0o644)
    where.chmod(0o755)


class Checks:
    def __init__(self, c: Container) -> None:
        self.c = c
        self.failed: list[str] = []

    def check(self, name: str, ok: bool, detail: str) -> None:
        log(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            self.failed.append(name)

    def status(self, user: str = "root") -> dict[str, Any]:
        return dict(json.loads(self.c.ctl("status", "--json", user=user)))

    def model(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.status()["models"] if m["name"] == name), None)

    def all(self) -> None:
        c = self.c
        c.write_config([("good", "good-v1.pt", "1")])
        t = time.monotonic()
        c.run(["systemctl", "start", "gpu-pool"], timeout=300)  # returns on READY=1
        took = time.monotonic() - t
        good = self.model("good") or {}
        ready_workers = [w for w in good.get("workers", []) if w["state"] == "ready"]
        self.check(
            "ready only once serving",
            good.get("status") == "serving" and bool(ready_workers),
            f"systemctl start returned after {took:.1f}s; right then pool-ctl status says "
            f"{good.get('status')} with {len(ready_workers)} ready worker(s)",
        )
        lines = c.journal().splitlines()
        ready_at = next((i for i, x in enumerate(lines) if " ready [pid" in x), None)
        started_at = next((i for i, x in enumerate(lines) if x.startswith("Started ")), None)
        self.check(
            "journal order",
            ready_at is not None and started_at is not None and ready_at < started_at,
            f"worker ready at journal line {ready_at}, systemd 'Started' at {started_at}",
        )
        text = c.show("StatusText")
        self.check("STATUS text", text == "serving 1 model(s)", f"StatusText={text!r}")
        for user in ("root", "gpu-pool"):
            try:
                st = self.status(user)
                self.check(
                    f"pool-ctl status as {user}",
                    [m["name"] for m in st["models"]] == ["good"],
                    f"no --control; poold pid {st['pid']}",
                )
            except RuntimeError as exc:
                self.check(f"pool-ctl status as {user}", False, str(exc))

        c.write_config([("good", "good-v1.pt", "1"), ("two", "two.pt", "1")])
        c.run(["systemctl", "reload", "gpu-pool"])
        two = wait(lambda: (m := self.model("two")) and m["status"] == "serving" and m, 120,
                   "two serving after the reload")  # fmt: skip
        wait(lambda: c.show("ActiveState") == "active", 60, "active after the reload")
        self.check("systemctl reload", bool(two), f"model two {two['status']} v{two['version']}")

        c.ctl("upgrade", "good", f"{IN_MODELS}/good-v2.pt", "--version", "2")
        before = c.show("MainPID")
        c.run(["kill", "-STOP", before])
        log(f"poold [pid {before}] frozen with SIGSTOP; waiting for the watchdog")
        wait(lambda: c.show("MainPID") not in ("0", before) and c.show("ActiveState") == "active",
             120, "a new poold after the watchdog")  # fmt: skip
        after = c.show("MainPID")
        good = wait(lambda: (m := self.model("good")) and m["status"] == "serving" and m, 120,
                    "good serving after the restart")  # fmt: skip
        dog = "atchdog timeout" in c.journal()
        self.check(
            "watchdog restart",
            dog and good["version"] == "2",
            f"poold {before} -> {after}; watchdog timeout in the journal: {dog}; "
            f"good back on version {good['version']} (committed by pool-ctl upgrade)",
        )

        c.write_config([("good", "good-v1.pt", "1"), ("broken", "broken.pt", "1")])
        c.run(["systemctl", "restart", "gpu-pool"], timeout=300)
        text = c.show("StatusText")
        active = c.show("ActiveState")
        self.check(
            "degraded READY",
            active == "active" and "degraded" in text and "broken" in text,
            f"ActiveState={active}; StatusText={text!r}",
        )
        errors = c.journal("-p", "err").splitlines()
        named = [x for x in errors if "broken" in x]
        self.check(
            "journalctl -p err",
            bool(named),
            f"{len(errors)} error line(s); e.g. {named[0][:160] if named else errors[:1]!r}",
        )
        cgroup = c.show("ControlGroup")
        c.run(["systemctl", "stop", "gpu-pool"], timeout=120)
        left = c.sh(
            f"cat /sys/fs/cgroup/systemd{cgroup}/cgroup.procs "
            f"/sys/fs/cgroup/unified{cgroup}/cgroup.procs /sys/fs/cgroup{cgroup}/cgroup.procs "
            "2>/dev/null; pgrep -f 'gpu-pool (worker|spawner)'",
            check=False,
        ).split()
        remains = "remains running after unit stopped" in c.journal()
        self.check(
            "systemctl stop",
            c.show("ActiveState") in ("inactive", "failed") and not left and not remains,
            f"ActiveState={c.show('ActiveState')}; processes left in {cgroup or 'the cgroup'}: "
            f"{left or 'none'}",
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="leave the container's files behind")
    args = ap.parse_args(argv)
    try:
        preflight()
        python = container_python()
    except Skip as exc:
        print(f"systemd live test SKIPPED: {exc}", flush=True)
        return SKIP
    top = Path(tempfile.mkdtemp(prefix="gpu-pool-live-"))
    top.chmod(0o755)
    c = Container(top, python)
    t0 = time.monotonic()
    try:
        (top / "models").mkdir()
        make_models(top / "models")
        c.build(top / "models")
        c.boot()
        log(c.run(["systemctl", "--version"]).splitlines()[0] + f"; poold runs on {python}")
        checks = Checks(c)
        try:
            checks.all()
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            checks.check("run", False, str(exc))
            print(c.journal("-n", "60", "-o", "short-monotonic") if c.init_pid else "")
    finally:
        c.stop()
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)
    log(f"{'all checks passed' if not checks.failed else 'FAILED: ' + ', '.join(checks.failed)}"
        f" in {time.monotonic() - t0:.0f}s")  # fmt: skip
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
