"""Hosts as Linux network namespaces, for tests that need several machines.

Each host is a namespace with one veth pair to the test's own namespace: the host side
``10.77.S.2/24``, the test side ``10.77.S.1/24``, a /24 of its own per host (S picked
from this process's pid so that two test runs on one machine do not collide). Traffic
stays inside the namespaces this kit made; :meth:`HostNet.close` deletes them, and
with them the veth pairs. Needs root and ``ip`` (iproute2); :func:`unavailable` says
why not, for a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "no ip command (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "ip netns needs root"
    probe = f"gpprobe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"ip netns add is not allowed here: {exc.stderr.strip()}"
    try:  # a sandbox may allow namespaces but not veth pairs
        _ip("link", "add", f"{probe}a", "type", "veth", "peer", "name", f"{probe}b")
        _ip("link", "set", f"{probe}b", "netns", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot make a veth pair here: {exc.stderr.strip()}"
    finally:
        for args in (("netns", "del", probe), ("link", "del", f"{probe}a")):
            try:
                _ip(*args)
            except subprocess.CalledProcessError:
                pass
    return None


@dataclass(frozen=True)
class NetHost:
    netns: str
    address: str  # the host's address, reachable from the test's namespace
    outside: str  # the test side of its veth pair

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


class HostNet:
    def __init__(self, count: int) -> None:
        self.hosts: list[NetHost] = []
        base = 10 + (os.getpid() % 60) * 4
        tag = f"{os.getpid() % 100000}"
        try:
            for i in range(count):
                subnet = base + i
                ns, outside, inside = f"gp{tag}h{i}", f"gp{tag}o{i}", f"gp{tag}i{i}"
                _ip("netns", "add", ns)
                self.hosts.append(NetHost(ns, f"10.77.{subnet}.2", outside))
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                _ip("link", "set", inside, "netns", ns)
                _ip("addr", "add", f"10.77.{subnet}.1/24", "dev", outside)
                _ip("link", "set", outside, "up")
                _ip("-n", ns, "addr", "add", f"10.77.{subnet}.2/24", "dev", inside)
                _ip("-n", ns, "link", "set", inside, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for h in self.hosts:
            for args in (("netns", "del", h.netns), ("link", "del", h.outside)):
                try:
                    _ip(*args)
                except subprocess.CalledProcessError:
                    pass  # deleting the namespace already took the pair with it
        self.hosts.clear()
