"""Typed fields: what each config key accepts, and how a raw value becomes that type.

``POOL_SPECS`` and ``MODEL_SPECS`` name every key of ``[pool]`` and ``[[models]]``; a
value from the file (``from_file``) or the environment (``from_env``) is converted to
the key's type or refused, then range- and content-checked (``validate``, with the
checks in ``pool.config_checks``). Problems are lines ``label: what is wrong (got X)``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pool.config_checks import (
    device_problem,
    directory_problem,
    endpoint_problem,
    file_problem,
    listen_problem,
    metrics_problem,
    model_name_problem,
    secret_key_problem,
    show,
    suggest,
    version_problem,
)


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
    "oip_spin_us": FieldSpec("int", "an integer from 0 to 10000", lambda v: 0 <= v <= 10_000),
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
