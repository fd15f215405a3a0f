"""Which hosts a ``pool-ctl fleet`` command talks to: a file of control endpoints, or a
DNS name with a port (a Kubernetes headless Service for the control port).

A hosts file has one control endpoint per line (``tcp://10.0.0.7:5556``, or ``ipc://``
for hosts on this machine); blank lines and ``#`` comments are skipped; the order of the
lines is the rollout order, so the first host is the default canary.
"""

from __future__ import annotations

from router.hosts import Resolver, getaddrinfo_resolver


class HostsError(ValueError):
    """The host list is unusable (pool-ctl exits 2): a bad line, a duplicate, none at all."""


def parse_hosts_file(text: str, source: str = "hosts file") -> list[str]:
    hosts: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not line.startswith(("tcp://", "ipc://")) or " " in line:
            raise HostsError(f"{source}:{n}: {line!r} is not a tcp:// or ipc:// control endpoint")
        if line in hosts:
            raise HostsError(f"{source}:{n}: {line} is listed twice")
        hosts.append(line)
    if not hosts:
        raise HostsError(f"{source} lists no hosts")
    return hosts


def read_hosts_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_hosts_file(f.read(), path)
    except OSError as exc:
        raise HostsError(f"cannot read {path}: {exc.strerror}") from None


def hosts_from_dns(name_port: str, resolve: Resolver = getaddrinfo_resolver) -> list[str]:
    """``NAME:PORT`` -> one ``tcp://ADDRESS:PORT`` per address NAME has, sorted."""
    name, sep, port = name_port.rpartition(":")
    if not sep or not name or not port.isdigit():
        raise HostsError(f"--dns wants NAME:PORT, got {name_port!r}")
    try:
        addresses = resolve(name, int(port))
    except OSError as exc:
        raise HostsError(f"{name} does not resolve: {exc}") from None
    if not addresses:
        raise HostsError(f"{name} resolves to no address")
    return [f"tcp://{a}:{port}" for a in addresses]
