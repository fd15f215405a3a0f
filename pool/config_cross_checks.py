"""Checks across ``[pool]`` keys: pairs that go together, and no non-loopback bind
without its protection (CURVE for the frontend and control, TLS for the Open Inference
Protocol, a token for the metrics), and endpoints that must differ."""

from __future__ import annotations

from typing import Any

from pool.config_checks import is_loopback_host, show, split_host_port, tcp_host


def cross_check_pool(
    merged: dict[str, Any], given: dict[str, Any], labels: dict[str, str], problems: list[str]
) -> None:
    """Checks across [pool] keys. ``given`` holds every typed value (valid or not), so a
    curve key that is set but broken counts as set: its own problem is already reported."""
    keys = ("curve_secret_key", "curve_authorized_keys")
    curve_set = [given.get(k) is not None for k in keys]
    if curve_set.count(True) == 1:
        present, absent = keys if curve_set[0] else keys[::-1]
        problems.append(f"{labels[present]}: must be set together with pool.{absent}")
    for key in ("frontend", "control"):
        host = tcp_host(merged[key])
        if host is not None and not is_loopback_host(host) and not all(curve_set):
            problems.append(
                f"{labels[key]}: refusing to listen on a non-loopback address without CURVE: "
                "set pool.curve_secret_key and pool.curve_authorized_keys "
                f"(got {show(merged[key])})"
            )
    cross_check_oip(merged, given, labels, problems)
    parts = split_host_port(merged["metrics"]) if merged["metrics"] else None
    if (
        parts is not None
        and not is_loopback_host(parts[0])
        and given.get("metrics_token_file") is None
        and not merged["metrics_insecure"]
    ):
        problems.append(
            f"{labels['metrics']}: refusing to serve metrics on a non-loopback address "
            "without a token: set pool.metrics_token_file (scrapers then send "
            '"Authorization: Bearer <token>"), or pool.metrics_insecure = true on a '
            f"trusted network (got {show(merged['metrics'])})"
        )
    if merged["frontend"] == merged["control"]:
        problems.append(f"{labels['control']}: must differ from pool.frontend")
    interval, timeout = merged["heartbeat_interval_s"], merged["heartbeat_timeout_s"]
    if timeout <= interval:  # else every worker would look dead between two beats
        problems.append(
            f"{labels['heartbeat_timeout_s']}: must be greater than pool.heartbeat_interval_s "
            f"(got {timeout} <= {interval})"
        )


def cross_check_oip(
    merged: dict[str, Any], given: dict[str, Any], labels: dict[str, str], problems: list[str]
) -> None:
    """TLS cert and key go together; a non-loopback OIP bind needs TLS or oip_insecure,
    the same rule as the frontend's CURVE; two endpoints cannot share one address."""
    keys = ("oip_tls_cert", "oip_tls_key")
    tls_set = [given.get(k) is not None for k in keys]
    if tls_set.count(True) == 1:
        present, absent = keys if tls_set[0] else keys[::-1]
        problems.append(f"{labels[present]}: must be set together with pool.{absent}")
    for key in ("http", "grpc"):
        parts = split_host_port(merged[key]) if merged[key] else None
        if parts is None:
            continue
        if not is_loopback_host(parts[0]) and not all(tls_set) and not merged["oip_insecure"]:
            problems.append(
                f"{labels[key]}: refusing to serve the Open Inference Protocol on a "
                "non-loopback address without TLS: set pool.oip_tls_cert and "
                "pool.oip_tls_key, or pool.oip_insecure = true behind a trusted proxy "
                f"(got {show(merged[key])})"
            )
    if merged["http"] and merged["http"] == merged["grpc"]:
        problems.append(f"{labels['grpc']}: must differ from pool.http")
    for key in ("http", "grpc"):
        if merged[key] and merged[key] == merged["metrics"]:
            problems.append(f"{labels[key]}: must differ from pool.metrics")
