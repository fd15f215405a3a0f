"""What the bench ran on: CPU, memory, GPUs, driver, library versions."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": "", "mem_gib": 0.0, "gpus": [], "driver": "",
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f
                                      if ln.startswith("model name")), "")
        info["mem_gib"] = round(mem_available() / 2**30, 1)
    except OSError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = _s(pynvml.nvmlSystemGetDriverVersion())
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h).total
            info["gpus"].append(f"{_s(pynvml.nvmlDeviceGetName(h))} ({mem / 2**30:.0f} GiB)")
    except Exception:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            rows = [r.split(", ") for r in out.stdout.strip().splitlines() if r.strip()]
            info["gpus"] = [f"{r[0]} ({r[1]})" for r in rows if len(r) >= 3]
            info["driver"] = rows[0][2] if rows and len(rows[0]) >= 3 else ""
        except (OSError, subprocess.SubprocessError):
            pass
    import torch

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda or ""
    info["cuda"] = bool(torch.cuda.is_available())  # no context: the bench never computes here
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception:
        info["torchvision"] = ""
    return info


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for ln in f:
            if ln.startswith("MemAvailable:"):
                return int(ln.split()[1]) * 1024
    return 0


def print_machine(info: dict[str, Any]) -> None:
    gpus = ", ".join(info["gpus"]) or "none"
    print(f"date {info['date']}  host {info['host']}  python {info['python']}")
    print(f"cpu  {info['cpus']} cores ({info['cpus_usable']} usable) {info['cpu_model']}; "
          f"{info['mem_gib']} GiB available; load average {info['loadavg'][0]:.2f} (1 min)")
    print(f"gpu  {gpus}{'  driver ' + info['driver'] if info['driver'] else ''}; "
          f"torch {info['torch']} (cuda {info['torch_cuda'] or 'none'}, "
          f"available: {info['cuda']}); torchvision {info['torchvision'] or 'absent'}")
