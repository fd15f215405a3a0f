"""Writing the small TOML configs that tests, the benchmark and the stress script start
poold with. tomllib reads TOML but does not write it; tomli-w writes what tomllib reads
(a hand-rolled writer once produced strings tomllib rejected, e.g. with an emoji)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tomli_w


def _plain(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def write_config(path: str, pool: Mapping[str, Any], models: Sequence[Mapping[str, Any]]) -> str:
    """A config file with a [pool] table and one [[models]] entry per mapping."""
    doc: dict[str, Any] = {"pool": _plain(pool)}
    if models:
        doc["models"] = [_plain(m) for m in models]
    with open(path, "wb") as f:
        tomli_w.dump(doc, f)
    return path
