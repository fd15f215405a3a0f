"""A private poold for a stress run: its own session, ipc sockets, state and log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as a plain script from anywhere: find pool/, router/, workers/
    sys.path.insert(0, ROOT)

class PoolProcess:
    """A private poold in ``directory``: its own session, ipc sockets and state."""

    def __init__(self, directory: str, model: dict[str, Any], **pool_opts: Any) -> None:
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.frontend = f"ipc://{directory}/front.sock"
        self.control = f"ipc://{directory}/ctl.sock"
        pool = {"frontend": self.frontend, "control": self.control,
                "state_dir": f"{directory}/state", "metrics": "",
                "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 30.0,
                "drain_timeout_s": 10.0, "stop_timeout_s": 5.0, **pool_opts}
        from pool.tomlwrite import write_config

        self.config = write_config(os.path.join(directory, "pool.toml"), pool, [model])
        self.log_path = os.path.join(directory, "poold.log")
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pool.poold", "--config", self.config],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def wait_serving(self, ctl: Any, timeout_s: float = 180.0) -> dict[str, Any]:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"poold exited {self.proc.returncode}; see {self.log_path}")
            try:
                data = ctl.call("status")["data"]
            except Exception:
                data = None
            if data and all(m["status"] == "serving" and m["workers"]
                            and all(w["state"] == "ready" for w in m["workers"])
                            for m in data["models"]):
                return dict(data)
            time.sleep(0.2)
        raise RuntimeError(f"poold not serving after {timeout_s:.0f}s; see {self.log_path}")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of its session
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait()
