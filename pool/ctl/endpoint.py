"""Which control endpoint pool-ctl talks to, and a fast check that someone listens there.

Without ``--control`` pool-ctl tries, in order, and takes the first whose socket exists:

1. ``$GPU_POOL_CONTROL`` (taken as given: the operator said so),
2. the per-user default poold itself uses (``$XDG_RUNTIME_DIR/gpu-pool/control.sock``,
   else the state dir's ``control.sock``),
3. the system unit's socket, ``/run/gpu-pool/control.sock`` (the shipped unit's
   ``RuntimeDirectory=``), so ``pool-ctl status`` works for root and for the
   ``gpu-pool`` user on a host that runs the unit, without ``--control``.

An ipc endpoint is probed with a plain ``connect(2)`` before ZeroMQ is involved: ZeroMQ
retries a refused ipc connect silently, so a socket file left by a crashed poold would
otherwise cost the whole connect timeout; the kernel answers ECONNREFUSED at once.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from typing import NamedTuple

from pool.config import ENV_PREFIX, default_control_endpoint, ipc_path

SYSTEM_CONTROL = "ipc:///run/gpu-pool/control.sock"
SCHEMES = ("ipc://", "tcp://")


class BadEndpoint(ValueError):
    """A --control value ZeroMQ cannot connect to: a usage error (exit 2)."""


class NotListening(Exception):
    """Nothing answers at the endpoint (exit 3); ``str`` says why in words."""


class Choice(NamedTuple):
    endpoint: str
    tried: tuple[str, ...]  # every candidate looked at, for the error message


def check_endpoint(endpoint: str) -> str:
    if not endpoint.startswith(SCHEMES):
        raise BadEndpoint(
            f"--control {endpoint!r}: expected ipc:///path/to/control.sock or tcp://HOST:PORT"
        )
    rest = endpoint.split("://", 1)[1]
    if not rest:
        raise BadEndpoint(f"--control {endpoint!r}: nothing after the scheme")
    if endpoint.startswith("tcp://"):
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BadEndpoint(f"--control {endpoint!r}: expected tcp://HOST:PORT")
    return endpoint


def _present(endpoint: str) -> bool:
    """True when the ipc socket file exists, or we may not look (then it is the one)."""
    path = ipc_path(endpoint)
    if path is None:
        return True
    try:
        os.stat(path)
    except PermissionError:
        return True  # a directory we cannot enter: report that, not "missing"
    except OSError:
        return False
    return True


def choose_endpoint(
    explicit: str | None, env: Mapping[str, str] | None = None, system: str = SYSTEM_CONTROL
) -> Choice:
    env = os.environ if env is None else env
    if explicit:
        return Choice(check_endpoint(explicit), (explicit,))
    if env.get(ENV_PREFIX + "CONTROL"):
        value = env[ENV_PREFIX + "CONTROL"]
        return Choice(check_endpoint(value), (value,))
    candidates = [default_control_endpoint(None, env), system]
    for c in candidates:
        if _present(c):
            return Choice(c, tuple(candidates))
    return Choice(candidates[0], tuple(candidates))


def probe(endpoint: str) -> None:
    """Raise NotListening unless an ipc endpoint has a listener (tcp is left to ZeroMQ)."""
    path = ipc_path(endpoint)
    if path is None:
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
    except FileNotFoundError:
        raise NotListening(f"no poold listening at {endpoint} (socket file missing)") from None
    except PermissionError:
        raise NotListening(
            f"permission denied on {path}: the control socket is the owner's only "
            f"(run pool-ctl as the user poold runs as, e.g. sudo -u gpu-pool, or as root)"
        ) from None
    except ConnectionRefusedError:
        raise NotListening(
            f"no poold listening at {endpoint} (stale socket file: poold is not running)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            raise NotListening(f"{path} is not a socket") from None
        raise NotListening(f"cannot connect to {endpoint}: {exc.strerror}") from None
    finally:
        s.close()
