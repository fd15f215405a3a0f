"""Version labels: what ``--version`` (and a model's ``version`` key) may be.

A label starts with a letter or digit and holds letters, digits and ``. _ + : -``, at
most 128 characters (the config's rule, ``pool.config_checks.VERSION_RE``): safe in a
URL path segment, a Prometheus label and a shell word without quoting. A label names
one file content: once a label has been committed for one digest, another digest may
not take it (``rollback --to LABEL`` must mean one thing). The default label, the
digest's first 12 hex digits, obeys both rules.
"""

from __future__ import annotations

from pool.config_checks import VERSION_RE
from pool.state import ModelState

__all__ = ["LABEL_PATTERN", "label_conflict", "label_problem"]

LABEL_PATTERN = VERSION_RE


def label_problem(label: str) -> str | None:
    """Why ``label`` is not a valid version label; None when it is."""
    if LABEL_PATTERN.fullmatch(label):
        return None
    return (
        f"version label {label[:80]!r} is not allowed: 1 to 128 characters, letters, "
        "digits and . _ + : - only, starting with a letter or digit"
    )


def label_conflict(state: ModelState, label: str, digest: str) -> str | None:
    """Why ``label`` cannot name ``digest`` here: it was committed for another file."""
    taken = [d for d in state.versions() if d.version == label and d.digest != digest]
    if state.current is not None and state.current.version == label:
        if state.current.digest != digest:
            taken.append(state.current)
    if not taken:
        return None
    other = taken[0]
    return (
        f"version label {label!r} already names another file ({other.digest[:19]}, "
        f"{other.path}); this one is {digest[:19]}: choose another label"
    )
