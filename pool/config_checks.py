"""Value checks behind ``pool.config``: endpoints, devices, names, paths.

A leaf module (imports nothing from ``pool``) so the daemon and ``pool-ctl`` can use the
same checks on values that never came from a config file (``upgrade MODEL PATH``).
Each ``*_problem`` function returns what is wrong, without the key (the caller prefixes
it), or None when the value is fine. What each config key accepts, built from these,
is ``pool.config_fields``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence

MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Versions end up in file names under state_dir, hence no '/' and no whitespace.
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}")
_DEVICE_RE = re.compile(r"cpu|cuda:(0|[1-9][0-9]*)")
_PORT_RE = re.compile(r"[0-9]{1,5}")  # not str.isdigit(): that accepts '²', which int() refuses
# sockaddr_un.sun_path is 108 bytes and libzmq needs the terminating NUL.
SUN_PATH_MAX = 107


class PathNotAllowed(ValueError):
    """A model path outside every allowed root, missing, or not a regular file."""


def show(value: object) -> str:
    """Render a value for "(got X)": TOML spelling for booleans, repr otherwise, capped."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def suggest(key: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest known key, or '' when nothing is close."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def ipc_path(endpoint: str) -> str | None:
    """The filesystem path of an ``ipc://`` endpoint; None for other transports and for
    Linux abstract sockets (``ipc://@name``), which have no file."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://") :]
    if not path or path.startswith("@"):
        return None
    return path


def split_host_port(text: str) -> tuple[str, str] | None:
    """'host:port' or '[v6]:port' -> (host, port) with brackets removed; None if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        return None
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")) or len(host) == 2:
            return None
        host = host[1:-1]
    elif ":" in host:
        return None  # a bare IPv6 address is ambiguous with the port separator
    return host, port


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (also written as ::ffff:127.x.y.z)."""
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False  # '*', an interface name or a host name: assume it is reachable
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def tcp_host(endpoint: str) -> str | None:
    """The host part of a well-formed ``tcp://`` endpoint, else None."""
    if not endpoint.startswith("tcp://"):
        return None
    parts = split_host_port(endpoint[len("tcp://") :])
    return parts[0] if parts else None


def endpoint_problem(value: str) -> str | None:
    """A bindable tcp://HOST:PORT or ipc://PATH endpoint (inproc is useless across processes)."""
    got = f"(got {show(value)})"
    if value.startswith("tcp://"):
        parts = split_host_port(value[len("tcp://") :])
        if parts is None:
            return f"must be tcp://HOST:PORT {got}"
        port = parts[1]
        if port != "*" and not (_PORT_RE.fullmatch(port) and 1 <= int(port) <= 65535):
            return f"port must be 1..65535 or * {got}"
        return None
    if value.startswith("ipc://"):
        path = value[len("ipc://") :]
        if not path:
            return f"ipc:// endpoint needs a path {got}"
        size = len(os.fsencode(path))
        if size > SUN_PATH_MAX:
            return (
                f"ipc path is {size} bytes, over the kernel's {SUN_PATH_MAX}-byte limit "
                f"for a unix socket path; use a shorter path {got}"
            )
        return None
    if value.startswith("inproc://"):
        return f"inproc:// is only reachable inside the daemon; use tcp:// or ipc:// {got}"
    return f"must start with tcp:// or ipc:// {got}"


def metrics_problem(value: str) -> str | None:
    """'' (HTTP endpoint off) or HOST:PORT with a real port."""
    if value == "":
        return None
    parts = split_host_port(value)
    if parts is None or not _PORT_RE.fullmatch(parts[1]) or not 0 <= int(parts[1]) <= 65535:
        return (
            f'must be "" or HOST:PORT with a port 0..65535 (0: any free port) (got {show(value)})'
        )
    return None


def listen_problem(value: str) -> str | None:
    """'' (off) or HOST:PORT with a port 1..65535, for the OIP endpoints."""
    if value == "":
        return None
    parts = split_host_port(value)
    if parts is None or not _PORT_RE.fullmatch(parts[1]) or not 1 <= int(parts[1]) <= 65535:
        return f'must be "" (off) or HOST:PORT with a port 1..65535 (got {show(value)})'
    return None


def device_problem(value: str) -> str | None:
    if _DEVICE_RE.fullmatch(value):
        return None
    return f'must be "cpu" or "cuda:N" with N >= 0 (got {show(value)})'


def model_name_problem(value: str) -> str | None:
    if MODEL_NAME_RE.fullmatch(value):
        return None
    return (
        "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
        f"(got {show(value)})"
    )


def version_problem(value: str) -> str | None:
    if VERSION_RE.fullmatch(value):
        return None
    return (
        "must be 1-128 letters, digits, '.', '_', '+', ':' or '-', starting with a letter "
        f"or digit (got {show(value)})"
    )


def directory_problem(path: str) -> str | None:
    if os.path.isdir(path):
        return None
    if os.path.exists(path):
        return f"not a directory {path}"
    return f"no such directory {path}"


def file_problem(path: str) -> str | None:
    if os.path.isfile(path):
        return None
    if os.path.exists(path):
        return f"not a regular file {path}"
    return f"no such file {path}"


def secret_key_problem(path: str) -> str | None:
    """An existing zmq.auth secret key file (catches passing the public half by mistake)."""
    problem = file_problem(path)
    if problem:
        return problem
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read(65536)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if "secret-key" not in text:
        return (
            f"{path} has no secret-key line; expected the NAME.key_secret file "
            "written by zmq.auth.create_certificates"
        )
    return None


def check_model_path(path: str, roots: Sequence[str]) -> str:
    """Return the realpath of ``path`` if it is a regular file inside one of ``roots``.

    Both sides are resolved with realpath, so a symlink under a root that points outside
    it is refused. The roots are checked before existence so that a caller cannot probe
    for files outside the roots. Raises PathNotAllowed with a message fit for a user.
    """
    real = os.path.realpath(path)
    real_roots = [os.path.realpath(root) for root in roots]
    if not any(os.path.commonpath([real, root]) == root for root in real_roots):
        shown = ", ".join(roots) if roots else "(none configured)"
        via = "" if real == path else f" (resolves to {real})"
        raise PathNotAllowed(f"{path}{via} is outside the allowed model roots: {shown}")
    problem = file_problem(real)
    if problem:
        raise PathNotAllowed(problem if real == path else f"{problem} (from {path})")
    return real
