"""CPU time per thread group of a process (the serving thread, libzmq's I/O threads, the
rest) from ``/proc``, and per request between two readings.
"""

from __future__ import annotations

import os


def cpu_ticks(pid: int) -> dict[str, int]:
    """utime+stime per thread group: "main" (the serving thread), "zmq" (libzmq's
    threads), "other" (torch's pools, the lifeline watcher, the CUDA waiter...)."""
    out = {"main": 0, "zmq": 0, "other": 0}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # the thread ended meanwhile
        comm = raw[raw.index(b"(") + 1 : raw.rindex(b")")]
        fields = raw[raw.rindex(b")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        group = "main" if int(tid) == pid else "zmq" if comm.startswith(b"ZMQbg") else "other"
        out[group] += ticks
    return out


def us_per_request(start: dict[str, int], end: dict[str, int], served: int) -> dict[str, float]:
    """CPU microseconds per request in each thread group between two ``cpu_ticks``."""
    hz = os.sysconf("SC_CLK_TCK")
    return {k: (end[k] - start[k]) / hz * 1e6 / max(1, served) for k in end}


def self_ticks() -> dict[str, int]:
    return cpu_ticks(os.getpid())
