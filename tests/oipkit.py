"""Helpers for the Open Inference Protocol tests: free ports, a mixed-dtype model, and
finding poold's gateway processes."""

from __future__ import annotations

import os
import socket

import psutil
import torch

from workers.manifest import InputSpec, write_manifest


class _HalfAndLong(torch.nn.Module):
    """forward(a: float16 [N, 4], b: int64 [N, 4]) -> (a * 2 as float16, b + 1 as int64)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a * 2, b + 1


def make_half_long(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.jit.script(_HalfAndLong()).save(path)
    write_manifest(
        os.path.splitext(path)[0] + ".toml",
        inputs=[InputSpec("float16", (1, 4)), InputSpec("int64", (1, 4))],
    )
    return path


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def gateway_pids(poold_pid: int, protocol: str) -> list[int]:
    """The pids of poold's running gateways for ``protocol``."""
    try:
        children = psutil.Process(poold_pid).children()
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            cmd = child.cmdline()
            if "gateway" in cmd and protocol in cmd and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def gateway_pid(poold_pid: int, protocol: str) -> int | None:
    """The pid of poold's running gateway for ``protocol`` (the first), or None."""
    pids = gateway_pids(poold_pid, protocol)
    return pids[0] if pids else None
