"""The bench's figures: each next to its same-run reference (``Compare``), and the
tables they are printed in.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Compare:
    """One figure next to its same-run reference."""

    section: str
    figure: str
    name: str
    value: float
    ref_name: str
    ref: float
    unit: str
    kind: str = "ratio"  # "ratio": value/ref >= target; "diff": value-ref <= target;
    # "max": value <= target (an absolute target; ref is shown beside it)
    target: float | None = None
    note: str = ""

    @property
    def result(self) -> float:
        if self.kind == "diff":
            return self.value - self.ref
        if self.kind == "max":
            return self.value
        return self.value / self.ref if self.ref else math.nan

    @property
    def met(self) -> bool | None:
        if self.target is None or not math.isfinite(self.result):
            return None
        return self.result >= self.target if self.kind == "ratio" else self.result <= self.target

    def shown(self) -> str:
        """The result as printed. Where the usual rounding would show the target itself
        while missing it (0.7998x against 0.8x), more digits are shown."""
        r = self.result
        prec = 2 if self.kind == "ratio" else _prec(self.unit)
        if self.met is False and self.target is not None:
            while prec < 6 and round(r, prec) == round(self.target, prec):
                prec += 1
        if self.kind == "max":
            return f"{r:.{prec}f} {self.unit}"
        return f"{r:.{prec}f}x" if self.kind == "ratio" else f"{r:+.{prec}f} {self.unit}"

    def row(self) -> list[str]:
        res = self.shown()
        tgt = "" if self.target is None else (
            f">= {self.target:g}x" if self.kind == "ratio" else
            f"<= {self.target:g} {self.unit}" if self.kind == "max" else
            f"<= {self.target:+g} {self.unit}")
        met = {None: "", True: "yes", False: "NO"}[self.met]
        return [self.section, self.figure, f"{self.name} {num(self.value)} {self.unit}",
                f"{self.ref_name} {num(self.ref)} {self.unit}", res, tgt, met, self.note]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "result": self.result, "met": self.met}


def _prec(unit: str) -> int:
    return 3 if unit == "s" else 0 if unit in ("us", "ms") else 1


def num(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if a >= 0.01 else f"{v:.2g}"


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    sys.stdout.flush()


def print_compare(title: str, comps: list[Compare]) -> None:
    print_table(title, ["section", "figure", "value", "reference (same run)", "ratio/diff",
                        "target", "met", "note"], [c.row() for c in comps])
