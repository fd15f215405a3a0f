"""Human-readable output for pool-ctl (rich tables); --json bypasses all of this."""

from __future__ import annotations

from typing import Any

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


def progress_line(msg: dict[str, Any]) -> str:
    phase = msg.get("phase", "?")
    extra = " ".join(
        f"{k}={v}"
        for k, v in msg.items()
        if k not in ("type", "phase", "elapsed_s") and v not in (None, [], {})
    )
    return f"[{msg.get('elapsed_s', 0):7.2f}s] {phase:<12} {extra}"


def print_status(data: dict[str, Any]) -> None:
    console = Console()
    console.print(
        f"poold pid {data.get('pid')}  up {data.get('uptime_s')}s  in flight {data.get('inflight')}"
    )
    for m in data.get("models", []):
        title = (
            f"{m['name']}  v{m.get('version')}  gen {m.get('generation')}  "
            f"({m.get('status')})  queue {m.get('queue')}"
        )
        if m.get("failed"):
            title += f"\nfailed: {m['failed']}"
        table = Table(title=title, title_justify="left")
        for col in (
            "pid",
            "device",
            "state",
            "version",
            "gen",
            "in-flight",
            "served",
            "GPU",
            "RSS",
        ):
            table.add_column(col, justify="right" if col in ("in-flight", "served") else "left")
        for w in m.get("workers", []):
            table.add_row(
                str(w.get("pid")),
                w.get("device", ""),
                w.get("state", ""),
                str(w.get("version")),
                str(w.get("generation")),
                str(w.get("inflight")),
                str(w.get("served")),
                _bytes(w.get("gpu_bytes")),
                _bytes(w.get("rss_bytes")),
            )
        console.print(table)


def print_history(data: dict[str, Any]) -> None:
    table = Table(title=f"history of {data.get('model')}", title_justify="left")
    for col in (
        "#",
        "at (UTC)",
        "action",
        "version",
        "outcome",
        "strategy",
        "time",
        "sha256 / reason",
    ):
        table.add_column(col, overflow="fold")
    for h in data.get("history", []):
        note = h.get("reason") or (h.get("digest") or "").removeprefix("sha256:")[:12]
        elapsed = h.get("elapsed_s")
        table.add_row(
            str(h.get("seq")),
            str(h.get("at", ""))[5:19].replace("T", " "),  # MM-DD HH:MM:SS, UTC
            h.get("action", ""),
            str(h.get("version")),
            h.get("outcome", ""),
            h.get("strategy") or "-",
            f"{elapsed:.2f}s" if isinstance(elapsed, int | float) else "-",
            note,
        )
    Console().print(table)


def print_upgrade(data: dict[str, Any], error: str) -> None:
    console = Console()
    if not data:  # refused before it started: nothing but the reason
        console.print(f"[bold red]not applied[/]: {error}")
        return
    if not data.get("ok"):
        console.print(
            f"[bold red]{data.get('action', 'operation')} of {data.get('model', '?')} "
            f"to {data.get('target_version', '?')} not applied[/]: {error}"
        )
        if data.get("outcome") == "rolled_back":
            console.print(f"still serving version {data.get('from_version')}")
        return
    console.print(
        f"[bold green]{data['action']} committed[/]: {data['model']} "
        f"{data.get('from_version')} -> {data.get('to_version')} "
        f"({data.get('strategy')}, {data.get('elapsed_s')}s)"
    )
    console.print(
        f"  started pids {data.get('pids_started')}, stopped pids {data.get('pids_stopped')}"
    )
    phases = {**data.get("worker_timings", {}), **data.get("phases", {})}
    console.print("  " + "  ".join(f"{k}={v:.3f}" for k, v in phases.items()))
    freed = data.get("bytes_freed") or {}
    if freed:
        console.print(
            "  freed "
            + ", ".join(f"{d}: {_bytes(b)}" for d, b in freed.items())
            + (
                ""
                if data.get("memory_back") in (None, True)
                else "  [yellow](memory not back within 16 MiB)[/]"
            )
        )
