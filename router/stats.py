"""What the router reports to the metrics: the observers' signatures, the status codes
the C core counts per worker, and the latency histogram bounds it uses by default."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from router import protocol as p

# Status strings a worker may put in a reply, counted by the C core per worker.
STATUS_CODES: tuple[str, ...] = ("OK", *sorted(p.ERROR_CODES))
# Default histogram bounds (seconds) when the caller gives none.
DEFAULT_BOUNDS: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)

# One request answered by Python: (model, version, code, queue_s, total_s). No worker timed
# it (a rejection, a deadline, a lost worker), so it has no in-worker wait or compute.
RequestObserver = Callable[[str, str, str, float, float], None]
# Requests the C core refused itself since the last flush: (model, code, count).
RejectionObserver = Callable[[str, str, int], None]
# Requests the C core answered since the last flush, for one worker: (model, version,
# {code: count}, [queue, in-worker wait, compute, total] bucket counts, their sums).
BulkObserver = Callable[[str, str, dict[str, int], list[list[int]], list[float]], None]


def code_counts(codes: Sequence[int]) -> dict[str, int]:
    """C's counts per ``STATUS_CODES`` index (the last slot: codes it did not know) as
    {code: count}, without the zeros; an unknown code counts as INTERNAL."""
    counts: dict[str, int] = {}
    for i, c in enumerate(codes):
        if c:
            code = STATUS_CODES[i] if i < len(STATUS_CODES) else p.INTERNAL
            counts[code] = counts.get(code, 0) + c
    return counts
