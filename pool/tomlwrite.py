"""Writing the small TOML configs that tests, the benchmark and the stress script start
poold with (tomllib reads TOML but does not write it)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, int | float):
        return repr(v)
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def write_config(path: str, pool: Mapping[str, Any], models: Sequence[Mapping[str, Any]]) -> str:
    """A config file with a [pool] table and one [[models]] entry per mapping."""
    lines = ["[pool]"] + [f"{k} = {toml_value(v)}" for k, v in pool.items()]
    for m in models:
        lines += ["", "[[models]]"] + [f"{k} = {toml_value(v)}" for k, v in m.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
