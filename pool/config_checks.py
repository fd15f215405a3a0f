"""Value checks and field specs behind ``pool.config``: endpoints, devices, names, paths.

A leaf module (imports nothing from ``pool``) so the daemon and ``pool-ctl`` can use the
same checks on values that never came from a config file (``upgrade MODEL PATH``).
Each ``*_problem`` function returns what is wrong, without the key (the caller prefixes
it), or None when the value is fine.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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


# Typed fields: what each config key accepts, and how a raw value becomes that type.


class BadValue(Exception):
    """A value of the wrong type; the spec's ``want`` says what was expected."""


def _always(_: Any) -> bool:
    return True


@dataclass(frozen=True)
class FieldSpec:
    kind: str  # str | int | float | bool | path | paths | strs | auto ("auto", true, false)
    want: str  # completes "must be ..."
    ok: Callable[[Any], bool] = _always  # range check on the typed value
    check: Callable[[Any], str | None] | None = None  # per item for list kinds
    optional: bool = False  # absent means None


def _pos(v: float) -> bool:
    return v > 0


def _nonneg(v: float) -> bool:
    return v >= 0


# "auto", true or false: a hot standby per device (workers.standby; auto = on for CUDA
# devices), the worker sandbox (workers.sandbox; auto = where the kernel has it).
AUTO_WANT = '"auto", true or false'
ENDPOINT_SPEC = FieldSpec("str", "a tcp:// or ipc:// endpoint", check=endpoint_problem)
_TIMEOUT = FieldSpec("float", "a number > 0", _pos)
_NONEMPTY = "a non-empty list (leave the key out for the default) of "
_LEVELS = sorted(logging.getLevelNamesMapping())

POOL_SPECS: dict[str, FieldSpec] = {
    "frontend": ENDPOINT_SPEC,
    "control": ENDPOINT_SPEC,
    "state_dir": FieldSpec("path", "a non-empty path"),
    "metrics": FieldSpec("str", '"" or HOST:PORT', check=metrics_problem),
    "model_roots": FieldSpec("paths", _NONEMPTY + "directories", check=directory_problem),
    "boot_timeout_s": _TIMEOUT,
    "heartbeat_interval_s": _TIMEOUT,
    "heartbeat_timeout_s": _TIMEOUT,
    "request_grace_s": FieldSpec("float", "a number >= 0", _nonneg),
    "drain_timeout_s": _TIMEOUT,
    "upgrade_timeout_s": _TIMEOUT,
    "stop_timeout_s": _TIMEOUT,
    "surge_margin_mb": FieldSpec("int", "an integer >= 0", _nonneg),
    "watch_requests": FieldSpec("int", "an integer >= 0 (0: no watch window)", _nonneg),
    "watch_s": FieldSpec("float", "a number >= 0 (0: no watch window)", _nonneg),
    "max_message_mb": FieldSpec("int", "an integer >= 1", _pos),
    "io_threads": FieldSpec("int", "0 (auto) or an integer >= 1", _nonneg),
    "max_connections": FieldSpec("int", "0 (auto) or an integer >= 1", _nonneg),
    "max_unread_reply_mb": FieldSpec("int", "0 (no bound) or an integer >= 1", _nonneg),
    "max_unread_reply_total_mb": FieldSpec("int", "0 (no bound) or an integer >= 1", _nonneg),
    "router_spin_us": FieldSpec("int", "-1 (auto) or an integer >= 0", lambda v: v >= -1),
    "router_lane": FieldSpec("bool", "true or false"),
    "standby": FieldSpec("auto", AUTO_WANT),
    "standby_preload": FieldSpec("auto", AUTO_WANT),
    "sandbox": FieldSpec("auto", AUTO_WANT),
    "curve_secret_key": FieldSpec(
        "path", "a key file path", check=secret_key_problem, optional=True
    ),
    "curve_authorized_keys": FieldSpec(
        "path", "a directory path", check=directory_problem, optional=True
    ),
    "http": FieldSpec("str", '"" or HOST:PORT', check=listen_problem),
    "grpc": FieldSpec("str", '"" or HOST:PORT', check=listen_problem),
    "oip_tls_cert": FieldSpec("path", "a PEM file path", check=file_problem, optional=True),
    "oip_tls_key": FieldSpec("path", "a PEM file path", check=file_problem, optional=True),
    "oip_insecure": FieldSpec("bool", "true or false"),
    "oip_processes": FieldSpec(
        "int", "0 (auto) or an integer from 1 to 64", lambda v: 0 <= v <= 64
    ),
    "oip_token_file": FieldSpec("path", "a file path", check=file_problem, optional=True),
    "metrics_insecure": FieldSpec("bool", "true or false"),
    "metrics_token_file": FieldSpec("path", "a file path", check=file_problem, optional=True),
    "log_format": FieldSpec("str", '"text" or "json"', lambda v: v in ("text", "json")),
    "log_level": FieldSpec(
        "str", f"a logging level ({', '.join(_LEVELS)})", lambda v: v in _LEVELS
    ),
}

MODEL_SPECS: dict[str, FieldSpec] = {
    "name": FieldSpec("str", "a model name", check=model_name_problem),
    "path": FieldSpec("path", "a file path", check=file_problem),
    "version": FieldSpec("str", 'a string such as "3"', check=version_problem, optional=True),
    "devices": FieldSpec("strs", _NONEMPTY + '"cpu" / "cuda:N"', check=device_problem),
    "max_batch": FieldSpec("int", "an integer >= 1", lambda v: v >= 1),
    "max_delay_ms": FieldSpec("float", "a number >= 0", _nonneg),
    "max_queue": FieldSpec("int", "an integer >= 1", lambda v: v >= 1),
    "request_timeout_s": _TIMEOUT,
    "retry_on_worker_loss": FieldSpec("bool", "true or false"),
    "cuda_graphs": FieldSpec("bool", "true or false"),
    "standby": FieldSpec("auto", AUTO_WANT, optional=True),  # None: the pool's
    "standby_preload": FieldSpec("auto", AUTO_WANT, optional=True),  # None: the pool's
    "sandbox": FieldSpec("auto", AUTO_WANT, optional=True),  # None: the pool's
    "max_requests": FieldSpec("int", "an integer >= 0", _nonneg),
    "max_requests_jitter": FieldSpec("float", "a number between 0 and 1", lambda v: 0 <= v <= 1),
    "max_rss_mb": FieldSpec("int", "an integer >= 0", _nonneg),
    "max_gpu_growth_mb": FieldSpec("int", "an integer >= 0", _nonneg),
    "threads": FieldSpec("int", "an integer >= 1", lambda v: v >= 1, optional=True),
}


def _resolve(path: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def from_file(spec: FieldSpec, value: Any, base: str) -> Any:
    """Type-check a TOML value and convert it; raises BadValue."""
    kind = spec.kind
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "auto" and (isinstance(value, bool) or value == "auto"):
        return value
    if isinstance(value, bool):  # bool is an int subclass; never accept it as a number
        raise BadValue
    if kind == "int" and isinstance(value, int):
        return value
    if kind == "float" and isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "path" and isinstance(value, str) and value:
        return _resolve(value, base)
    # An explicit [] would silently mean "the default", so the file must leave the key out.
    if kind in ("paths", "strs") and isinstance(value, list) and value:
        if all(isinstance(v, str) and (v or kind == "strs") for v in value):
            return tuple(_resolve(v, base) if kind == "paths" else v for v in value)
    raise BadValue


def from_env(spec: FieldSpec, text: str) -> Any:
    """Parse an environment string to the field's type; raises BadValue."""
    kind = spec.kind
    if kind == "auto":
        word = text.strip().lower()
        if word in ("auto", "true", "false", "1", "0"):
            return "auto" if word == "auto" else word in ("true", "1")
        raise BadValue
    if kind == "int" and re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):
        return int(text)
    if kind == "float":
        try:
            number = float(text)
        except ValueError:
            raise BadValue from None
        if math.isfinite(number):
            return number
        raise BadValue
    if kind == "path":
        if not text and spec.optional:
            return None  # GPU_POOL_CURVE_SECRET_KEY= switches it off
        if text:
            return _resolve(text, os.getcwd())
        raise BadValue
    # ':'-separated like PATH; empty parts (from "$X:/dir" idioms) are skipped, and an
    # empty value gives (), the default, so GPU_POOL_MODEL_ROOTS= undoes the file's list.
    if kind == "paths":
        return tuple(_resolve(p, os.getcwd()) for p in text.split(":") if p)
    if kind == "str":
        return text
    raise BadValue


def validate(label: str, spec: FieldSpec, value: Any, problems: list[str], env: bool) -> bool:
    """Range and content checks on a typed value; True when it is fine."""
    if value is None:
        return True
    if not spec.ok(value):
        problems.append(f"{label}: must be {spec.want} (got {show(value)})")
        return False
    if spec.check is None:
        return True
    many = spec.kind in ("paths", "strs")
    found = False
    for i, item in enumerate(value if many else (value,)):
        problem = spec.check(item)
        if problem:
            # An env list has no index the user could find, so name the variable alone.
            problems.append(
                f"{label}[{i}]: {problem}" if many and not env else f"{label}: {problem}"
            )
            found = True
    return not found


def check_section(
    table: Any, specs: dict[str, FieldSpec], prefix: str, base: str, problems: list[str]
) -> dict[str, Any]:
    """Type-check one TOML table against its specs; returns the values that passed."""
    if not isinstance(table, dict):
        problems.append(f"{prefix}: must be a table (got {show(table)})")
        return {}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        spec = specs.get(key)
        if spec is None:
            problems.append(f"{prefix}.{key}: unknown key{suggest(key, specs)}")
            continue
        try:
            values[key] = from_file(spec, raw, base)
        except BadValue:
            problems.append(f"{prefix}.{key}: must be {spec.want} (got {show(raw)})")
    return values
