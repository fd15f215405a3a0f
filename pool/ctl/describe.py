"""``pool-ctl describe MODEL``: the contract, for people (``--json`` prints it raw)."""

from __future__ import annotations

from typing import Any


def _tensor(t: dict[str, Any]) -> str:
    dims = []
    for i, n in enumerate(t.get("shape") or []):
        dims.append("N" if i == t.get("batch_dim") else ("?" if n == -1 else str(n)))
    return f"{t.get('name')}: {t.get('dtype')}[{', '.join(dims)}]"


def describe_lines(data: dict[str, Any]) -> list[str]:
    batching = data.get("batching") or {}
    lines = [
        f"{data.get('name')}  serving version {data.get('version') or '-'}  "
        f"on {', '.join(data.get('devices') or []) or '-'}",
    ]
    if data.get("schema"):
        lines.append(f"  schema: {data['schema']}")
    if not data.get("contract_known"):
        note = data.get("contract_note") or "not checked (no example inputs)"
        lines.append(f"  contract: {note}")
        lines.append(
            "    upgrades are not checked against it until a manifest's inputs, an "
            "example_inputs attribute or the first request gives dtypes and shapes"
        )
    else:
        lines.append(f"  contract from: {data.get('contract_source')}")
        for kind in ("inputs", "outputs"):
            lines.append(f"  {kind}:")
            lines += [f"    {_tensor(t)}" for t in data.get(kind) or []]
    if batching.get("batchable"):
        lines.append(
            f"  batching: up to {batching.get('max_batch')} rows, "
            f"waits up to {batching.get('max_delay_ms')} ms (N is the batch dimension)"
        )
    else:
        lines.append("  batching: off (one request per forward)")
    lines.append("  versions (newest first):")
    for v in data.get("versions") or []:
        mark = "*" if v.get("serving") else " "
        sig = ", ".join(_tensor(t) for t in v.get("inputs") or []) or "?"
        out = ", ".join(_tensor(t) for t in v.get("outputs") or []) or "?"
        lines.append(
            f"   {mark} {v.get('version')}  {str(v.get('digest'))[:19]}  ({sig}) -> ({out})"
        )
    return lines


def print_describe(data: dict[str, Any]) -> None:
    print("\n".join(describe_lines(data)))
