"""Human-readable output for pool-ctl; --json bypasses all of this.

On a terminal: rich tables. Anywhere else (a pipe, a file, a CI log): plain columns
separated by two spaces, one row per line, never wrapped or truncated, so ``grep`` and
``awk`` see whole rows whatever the width.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table


def _bytes(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cell(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def terminal() -> bool:
    return sys.stdout.isatty()


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """One table: rich on a terminal, plain aligned columns elsewhere."""
    cells = [[_cell(v) for v in row] for row in rows]
    if terminal():
        t = Table(title=title, title_justify="left")
        for col in columns:
            t.add_column(col, overflow="fold")
        for row in cells:
            t.add_row(*row)
        Console().print(t)
        return
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    if title:
        print(title)
    for row in [list(columns), *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def say(text: str, style: str = "") -> None:
    """A line of prose; colour only on a terminal."""
    if terminal() and style:
        Console().print(f"[{style}]{text}[/]", highlight=False)
    else:
        print(text)


def progress_line(msg: dict[str, Any]) -> str:
    phase = msg.get("phase", "?")
    extra = " ".join(
        f"{k}={v}"
        for k, v in msg.items()
        if k not in ("type", "phase", "elapsed_s") and v not in (None, [], {})
    )
    return f"[{msg.get('elapsed_s', 0):7.2f}s] {phase:<12} {extra}"


def bar(done: int, total: int, width: int = 30) -> str:
    """``[#########.....]  120.0 MiB / 600.0 MiB  20%``"""
    frac = min(1.0, done / total) if total > 0 else 1.0
    filled = int(frac * width)
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] "
        f"{_bytes(done)} / {_bytes(total)} {frac:4.0%}"
    )


class Progress:
    """Progress lines on stderr. Byte counts (hashing a model file) redraw one bar in
    place on a terminal and are left out elsewhere, so a log gets phases only."""

    def __init__(self, stream: TextIO, tty: bool, quiet: bool = False) -> None:
        self.stream = stream
        self.tty = tty
        self.quiet = quiet
        self.drawing = False

    def __call__(self, msg: dict[str, Any]) -> None:
        if self.quiet:
            return
        if "bytes" in msg and "total" in msg:
            if self.tty:
                line = f"[{msg.get('elapsed_s', 0):7.2f}s] {msg.get('phase', ''):<12} "
                done, total = int(msg["bytes"] or 0), int(msg["total"] or 0)
                self.stream.write("\r" + line + bar(done, total))
                self.stream.flush()
                self.drawing = True
            return
        if self.drawing:
            self.stream.write("\n")
            self.drawing = False
        print(progress_line(msg), file=self.stream, flush=True)


GATEWAY_COLUMNS = ("protocol", "address", "pid", "up", "restarts", "last exit")
WORKER_COLUMNS = (
    "pid", "device", "state", "version", "gen", "in-flight", "served", "GPU", "RSS", "sandbox",
)  # fmt: skip


def sandbox_word(report: Any) -> str:
    """A worker's sandbox in one word or two (workers.sandbox.SandboxReport): what
    confines its files, or that nothing does; "-" before it said."""
    if not isinstance(report, dict):
        return "-"
    if not report.get("applied"):
        return "off"
    if report.get("fs"):
        return f"landlock {report.get('landlock_abi')}"
    return "net only"


def print_status(data: dict[str, Any]) -> None:
    say(
        f"poold pid {data.get('pid')}  up {data.get('uptime_s')}s  in flight {data.get('inflight')}"
    )
    for m in data.get("models", []):
        title = (
            f"{m['name']}  v{m.get('version')}  gen {m.get('generation')}  "
            f"({m.get('status')})  queue {m.get('queue')}"
        )
        if m.get("failed"):
            title += f"  failed: {m['failed']}"
        rows = [
            (
                w.get("pid") if w.get("pid") is not None else "(spawning)",
                w.get("device"),
                w.get("state"),
                w.get("version"),
                w.get("generation"),
                w.get("inflight"),
                w.get("served"),
                _bytes(w.get("gpu_bytes")),
                _bytes(w.get("rss_bytes")),
                sandbox_word(w.get("sandbox")),
            )
            for w in m.get("workers", [])
        ]
        table(title, WORKER_COLUMNS, rows)
    sb = data.get("standby") or {}
    for x in sb.get("standbys", []):
        pre = x.get("preload") or {}
        held = (
            f"{pre.get('model')} v{pre.get('version')} on the host "
            f"({_bytes(pre.get('bytes'))})"
            if pre.get("state") == "loaded"
            else f"reading {pre.get('model')} v{pre.get('version')} onto the host"
            if pre.get("state") == "loading"
            else "no model"
        )
        say(
            f"standby pid {x.get('pid')} on {x.get('device')}: {x.get('state')}, "
            f"GPU {_bytes(x.get('gpu_bytes'))}, {held}"
        )
    for device, why in (sb.get("given_up") or {}).items():
        say(f"no standby on {device}: {why}", "yellow")
    for device, why in (sb.get("preload_refused") or {}).items():
        say(f"standby on {device} preloads nothing: {why}")
    gateways = data.get("gateways") or []
    if gateways:
        gateway_rows = [
            (
                g.get("protocol"),
                g.get("listen"),
                g.get("pid") or "-",
                "up" if g.get("up") else "down",
                g.get("restarts"),
                g.get("last_exit") or "-",
            )
            for g in gateways
        ]
        table("OIP gateways", GATEWAY_COLUMNS, gateway_rows)


def print_list(data: dict[str, Any]) -> None:
    rows = [
        (
            m.get("name"),
            m.get("version"),
            m.get("status"),
            ",".join(m.get("devices") or []),
            f"{m.get('ready', 0)}/{len(m.get('devices') or [])}",
            m.get("path"),
        )
        for m in data.get("models", [])
    ]
    table("", ("model", "version", "status", "devices", "ready", "path"), rows)


def describe_done(data: dict[str, Any]) -> str:
    """``version 3 on cpu, cpu in 1.20s`` for a load/unload/scale result."""
    parts = []
    version = data.get("version") or data.get("to_version")
    if version:
        parts.append(f"version {version}")
    if data.get("devices"):
        parts.append("on " + ", ".join(data["devices"]))
    if "pids_kept" in data:  # a scale: every list, empty ones too, so scripts can grep
        for key in ("kept", "started", "stopped"):
            parts.append(f"{key} pids {data.get('pids_' + key) or []}")
    elif data.get("pids_stopped"):
        parts.append(f"stopped pids {data['pids_stopped']}")
    if data.get("elapsed_s") is not None:
        parts.append(f"in {data['elapsed_s']}s")
    return " ".join(parts)


def print_history(data: dict[str, Any]) -> None:
    rows = []
    for h in data.get("history", []):
        note = h.get("reason") or (h.get("digest") or "").removeprefix("sha256:")[:12]
        elapsed = h.get("elapsed_s")
        rows.append(
            (
                h.get("seq"),
                str(h.get("at", ""))[5:19].replace("T", " "),  # MM-DD HH:MM:SS, UTC
                h.get("action", ""),
                h.get("version"),
                h.get("outcome", ""),
                h.get("strategy") or "-",
                f"{elapsed:.2f}s" if isinstance(elapsed, int | float) else "-",
                note,
            )
        )
    columns = ("#", "at (UTC)", "action", "version", "outcome", "strategy", "time", "sha256/reason")
    table(f"history of {data.get('model')}", columns, rows)


def print_reload(data: dict[str, Any]) -> None:
    outcomes = data.get("outcomes") or []
    if outcomes:
        table(
            "",
            ("model", "outcome", "detail"),
            [(o.get("model"), o.get("outcome"), o.get("detail")) for o in outcomes],
        )
    for line in [*(data.get("changes") or []), *(data.get("problems") or [])]:
        print(line)
    for line in data.get("notes") or []:
        print(line)
    if not outcomes and not data.get("problems") and not data.get("changes"):
        print("no changes")


def print_upgrade(data: dict[str, Any], error: str) -> None:
    # Refused, or cancelled while its file hashed: no plan ran, nothing but the reason.
    if not data or "action" not in data:
        say(f"not applied: {error}", "bold red")
        return
    if not data.get("ok"):
        say(
            f"{data.get('action', 'operation')} of {data.get('model', '?')} "
            f"to {data.get('target_version', '?')} not applied: {error}",
            "bold red",
        )
        if data.get("outcome") in ("rolled_back", "cancelled"):
            say(f"still serving version {data.get('from_version')}")
        elif data.get("outcome") == "restore_failed":
            why = (data.get("restore") or {}).get("reason", "?")
            say(f"version {data.get('from_version')} could not be put back: {why}", "bold red")
        return
    say(
        f"{data['action']} committed: {data['model']} "
        f"{data.get('from_version')} -> {data.get('to_version')} "
        f"({data.get('strategy')}, {data.get('elapsed_s')}s)",
        "bold green",
    )
    say(f"  started pids {data.get('pids_started')}, stopped pids {data.get('pids_stopped')}")
    standby = data.get("standby") or {}
    if standby.get("taken"):
        staged = ", weights staged on the host first" if standby.get("staged") else ""
        say(f"  started in {standby['taken']} hot standby(s){staged}")
    if str(data.get("contract", "")).startswith("not checked"):
        say(f"  contract {data['contract']}", "yellow")
    phases = {**data.get("worker_timings", {}), **data.get("phases", {})}
    if phases:
        say("  " + "  ".join(f"{k}={v:.3f}" for k, v in phases.items()))
    freed = data.get("bytes_freed") or {}
    if freed:
        back = data.get("memory_back") in (None, True)
        say(
            "  freed "
            + ", ".join(f"{d}: {_bytes(b)}" for d, b in freed.items())
            + ("" if back else "  (memory not back within 16 MiB)")
        )
