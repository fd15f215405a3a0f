"""Configuration: the TOML file, ``GPU_POOL_*`` environment overrides, and validation.

``load_config`` reads the file, applies the environment (env wins over the file), checks
every value and raises a single ``ConfigError`` that lists every problem, each as
``key.path: what is wrong (got X)``; ``check_config`` returns that list instead.

Relative paths in the file are relative to the file's directory; relative paths from the
environment are relative to the working directory. ``~`` is expanded in both.

The records and their defaults are ``pool.config_records``, what each key accepts is
``pool.config_fields`` (with the value checks of ``pool.config_checks``), and the rules
across ``[pool]`` keys are ``pool.config_cross_checks``; the names callers use are
re-exported here.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
from typing import Any

from pool.config_checks import (
    MODEL_NAME_RE,
    VERSION_RE,
    PathNotAllowed,
    check_model_path,
    ipc_path,
    show,
    suggest,
)
from pool.config_cross_checks import cross_check_pool
from pool.config_fields import (
    ENDPOINT_SPEC,
    MODEL_SPECS,
    POOL_SPECS,
    BadValue,
    check_section,
    from_env,
    validate,
)
from pool.config_records import (
    ENV_PREFIX,
    Config,
    ModelConfig,
    PoolConfig,
    default_control_endpoint,
    default_state_dir,
    effective_model_roots,
    sandbox_mode,
    standby_wanted,
)

__all__ = [
    "ENV_PREFIX", "MODEL_NAME_RE", "VERSION_RE", "Config", "ConfigError", "ModelConfig",
    "PathNotAllowed", "PoolConfig", "check_config", "check_model_path",
    "default_control_endpoint", "default_state_dir", "effective_model_roots", "ipc_path",
    "load_config", "sandbox_mode", "standby_wanted",
]  # fmt: skip


class ConfigError(Exception):
    """Every problem found in one configuration; ``problems`` holds one line each."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        count = len(self.problems)
        where = f" in {source}" if source else ""
        head = f"invalid configuration{where} ({count} problem{'' if count == 1 else 's'}):"
        super().__init__("\n  ".join([head, *self.problems]))

    def __reduce__(self) -> tuple[Any, ...]:  # keep problems intact across pickling
        return (type(self), (self.problems, self.source))


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def _load_pool(table: Any, base: str, env: Mapping[str, str], problems: list[str]) -> PoolConfig:
    """[pool] with env overrides. Type errors are reported for every source; range and
    content checks only for the value that wins (a bad file value that env replaces is
    still a type error in the file, but a missing directory there is not our business)."""
    values = check_section(table, POOL_SPECS, "pool", base, problems)
    labels = {key: f"pool.{key}" for key in POOL_SPECS}
    overridden: set[str] = set()
    for key, spec in POOL_SPECS.items():
        name = ENV_PREFIX + key.upper()
        if name not in env:
            continue
        labels[key] = f"env {name}"
        overridden.add(key)
        values.pop(key, None)
        try:
            values[key] = from_env(spec, env[name])
        except BadValue:
            problems.append(f"env {name}: must be {spec.want} (got {show(env[name])})")
    if isinstance(values.get("log_level"), str):
        values["log_level"] = values["log_level"].upper()
    good = {
        key: value
        for key, value in values.items()
        if validate(labels[key], POOL_SPECS[key], value, problems, key in overridden)
    }
    merged = _defaults(PoolConfig) | {"state_dir": default_state_dir(env)} | good
    provided = overridden | (table.keys() if isinstance(table, dict) else set())
    if "control" not in provided:
        merged["control"] = default_control_endpoint(merged["state_dir"], env)
        labels["control"] = "pool.control (default)"
        validate(labels["control"], ENDPOINT_SPEC, merged["control"], problems, False)
    cross_check_pool(merged, values, labels, problems)
    return PoolConfig(**merged)


def _load_models(
    entries: Any, base: str, roots: tuple[str, ...], problems: list[str]
) -> tuple[ModelConfig, ...]:
    if not isinstance(entries, list):
        problems.append(f"models: must be an array of tables ([[models]]) (got {show(entries)})")
        return ()
    models: list[ModelConfig] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        prefix = f"models[{i}]"
        before = len(problems)
        values = check_section(entry, MODEL_SPECS, prefix, base, problems)
        if isinstance(entry, dict):
            problems.extend(f"{prefix}.{k}: required" for k in ("name", "path") if k not in entry)
        for key, value in values.items():
            validate(f"{prefix}.{key}", MODEL_SPECS[key], value, problems, False)
        name = values.get("name")
        if isinstance(name, str) and name in seen:
            problems.append(
                f"{prefix}.name: duplicate model name {name!r} (also models[{seen[name]}])"
            )
        elif isinstance(name, str):
            seen[name] = i
        if len(problems) == before and roots:
            try:
                check_model_path(values["path"], roots)
            except PathNotAllowed as exc:
                problems.append(f"{prefix}.path: {exc}")
        if len(problems) == before:
            models.append(ModelConfig(**values))
    return tuple(models)


def load_config(path: str | None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (None: defaults, no models), apply ``env`` (default ``os.environ``)
    and return the Config, or raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    doc: dict[str, Any] = {}
    source = None
    base = os.getcwd()
    if path is not None:
        source = os.path.abspath(path)
        base = os.path.dirname(source)
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([f"{path}: no such file"], source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: TOML syntax error: {exc}"], source) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{path}: not UTF-8 text ({exc.reason})"], source) from None
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror}"], source) from None
    for key in (k for k in doc if k not in ("pool", "models")):
        problems.append(f"{key}: unknown top-level key{suggest(key, ['pool', 'models'])}")
    pool = _load_pool(doc.get("pool", {}), base, env, problems)
    models = _load_models(doc.get("models", []), base, pool.model_roots, problems)
    if problems:
        raise ConfigError(problems, source)
    return Config(pool=pool, models=models, source=source)


def check_config(path: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Every problem in the file at ``path`` (with ``env`` applied); [] when it is fine."""
    try:
        load_config(path, env)
    except ConfigError as exc:
        return exc.problems
    return []
