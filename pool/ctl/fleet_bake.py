"""The canary's bake window: did the new version answer as well as the rest of the fleet?

Each host's ``stats`` control command returns counters since its poold started; two
readings, at the start and the end of the window, give what happened inside it. The
canary's side counts only answers from the new version (plus errors no version computed,
such as deadlines), the rest's side everything the other hosts answered. The canary fails
when its error rate exceeds the rest's by more than ``max_error_rate_increase``, or its
mean latency exceeds the rest's times ``max_latency_ratio`` plus ``latency_slack_s``
(the slack keeps microsecond noise on an idle fleet from failing a rollout).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Codes that say the caller was wrong, not the host: they do not count against a version.
CLIENT_FAULTS = frozenset({"OK", "BAD_REQUEST", "NO_SUCH_MODEL", "UNSUPPORTED_PROTOCOL"})


@dataclass(frozen=True)
class BakeRules:
    seconds: float = 30.0
    max_error_rate_increase: float = 0.01
    max_latency_ratio: float = 1.5
    latency_slack_s: float = 0.005
    min_requests: int = 0  # the canary must answer at least this many in the window


@dataclass(frozen=True)
class Window:
    requests: int
    errors: int
    latency_count: int
    latency_sum_s: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def mean_latency_s(self) -> float:
        return self.latency_sum_s / self.latency_count if self.latency_count else 0.0

    def __add__(self, other: Window) -> Window:
        return Window(
            self.requests + other.requests,
            self.errors + other.errors,
            self.latency_count + other.latency_count,
            self.latency_sum_s + other.latency_sum_s,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "mean_latency_ms": round(self.mean_latency_s * 1000, 3),
        }


EMPTY = Window(0, 0, 0, 0.0)


@dataclass(frozen=True)
class BakeVerdict:
    ok: bool
    reason: str
    canary: Window
    rest: Window

    def describe(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reason": self.reason,
            "canary": self.canary.describe(),
            "rest": self.rest.describe(),
        }


def window(
    before: Mapping[str, Any], after: Mapping[str, Any], model: str, versions: Iterable[str] | None
) -> Window:
    """What ``model`` answered between two ``stats`` readings of one host; ``versions``
    limits the request counts to those versions (None: all)."""
    keep = None if versions is None else set(versions)

    def rows(data: Mapping[str, Any]) -> dict[tuple[str, str], int]:
        m = (data.get("models") or {}).get(model) or {}
        return {(str(v), str(c)): int(n) for v, c, n in m.get("requests", [])}

    def latency(data: Mapping[str, Any]) -> tuple[int, float]:
        m = ((data.get("models") or {}).get(model) or {}).get("latency") or {}
        return sum(int(n) for n in m.get("counts", [])), float(m.get("sum_s", 0.0))

    b, a = rows(before), rows(after)
    requests = errors = 0
    for key, n in a.items():
        version, code = key
        if keep is not None and version not in keep:
            continue
        delta = n - b.get(key, 0)
        requests += delta
        if code not in CLIENT_FAULTS:
            errors += delta
    (nb, sb), (na, sa) = latency(before), latency(after)
    return Window(requests, errors, na - nb, sa - sb)


def judge(canary: Window, rest: Window, rules: BakeRules) -> BakeVerdict:
    def verdict(ok: bool, reason: str) -> BakeVerdict:
        return BakeVerdict(ok, reason, canary, rest)

    if canary.requests < rules.min_requests:
        return verdict(
            False,
            f"the canary answered {canary.requests} requests in the bake window, "
            f"fewer than the {rules.min_requests} required to judge it",
        )
    limit = rest.error_rate + rules.max_error_rate_increase
    if canary.error_rate > limit:
        return verdict(
            False,
            f"canary error rate {canary.error_rate:.2%} ({canary.errors}/{canary.requests}) "
            f"above the rest's {rest.error_rate:.2%} + {rules.max_error_rate_increase:.2%}",
        )
    if canary.latency_count and rest.latency_count:
        bound = rest.mean_latency_s * rules.max_latency_ratio + rules.latency_slack_s
        if canary.mean_latency_s > bound:
            return verdict(
                False,
                f"canary mean latency {canary.mean_latency_s * 1000:.1f} ms above the "
                f"rest's {rest.mean_latency_s * 1000:.1f} ms x {rules.max_latency_ratio:g} "
                f"+ {rules.latency_slack_s * 1000:g} ms",
            )
    note = "" if canary.requests else " (no traffic reached the canary: nothing to compare)"
    return verdict(True, "canary within bounds" + note)
