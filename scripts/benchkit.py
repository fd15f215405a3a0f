"""Plumbing for scripts/bench.py, gathered in one import: child processes
(``benchkit_procs``), client runs and a real poold (``benchkit_pool``), the machine
(``benchkit_machine``), and the figures next to their references (``benchkit_compare``).

Every process the bench starts gets its own session and is killed by its group id when
the bench is done with it (or when the bench itself exits), never by name.
"""

from __future__ import annotations

from benchkit_compare import Compare, num, print_compare, print_table
from benchkit_machine import machine_info, mem_available, print_machine
from benchkit_pool import Load, Pool, run_clients, start_pool, stop_pool
from benchkit_procs import (
    ROLES_PY,
    ROOT,
    BenchError,
    Procs,
    child_env,
    cpu_seconds,
    err_tail,
    readline,
    wait_ready,
)

__all__ = [
    "ROLES_PY", "ROOT", "BenchError", "Compare", "Load", "Pool", "Procs", "child_env",
    "cpu_seconds", "err_tail", "machine_info", "mem_available", "num", "print_compare",
    "print_machine", "print_table", "readline", "run_clients", "start_pool", "stop_pool",
    "wait_ready",
]  # fmt: skip
