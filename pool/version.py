"""The installed version of gpu-pool, for ``--version`` and ``gpupool_build_info``."""

from __future__ import annotations

import platform
from functools import cache
from importlib import metadata


@cache
def version() -> str:
    try:
        return metadata.version("gpu-pool")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def version_line(prog: str) -> str:
    """``poold 0.1.0 (Python 3.12.3)``: what ``--version`` prints."""
    return f"{prog} {version()} (Python {platform.python_version()})"
