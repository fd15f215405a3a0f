"""``describe``: a model's contract as the control command answers it (the equivalent
of the Open Inference Protocol's model metadata).

Reply body (keys may be added, never renamed)::

    {"name": str, "version": str,                       # the serving version
     "versions": [{"version", "digest", "inputs", "outputs"}, ...],   # newest first
     "inputs":  [{"name", "dtype", "shape": [int, ...], "batch_dim": 0 | null}, ...],
     "outputs": [same form],
     "batching": {"batchable": bool, "max_batch": int, "max_delay_ms": float},
     "devices": [str, ...],
     "contract_known": bool, "contract_source": str | null,
     "contract_note": str,                 # "" when known, else "not checked (...)"
     "schema": str | null}                 # forward()'s signature as the file states it

A dynamic dimension (the batch, a sequence length) is -1. Until a worker of the serving
version has reported its contract (at once with a manifest, example inputs the file
carries, or a recorded contract; otherwise after its first request), ``inputs``/
``outputs`` are empty, ``contract_known`` is false, ``contract_note`` says that
upgrades are not checked, and ``schema`` shows what forward()'s signature tells
(argument names; TorchScript gives no dtypes or shapes).
"""

from __future__ import annotations

from typing import Any

from pool.contract import NOT_CHECKED_SERVING, Contract, ContractError
from pool.runtime import ModelRuntime

__all__ = ["describe_model"]


def _recorded(rt: ModelRuntime, digest: str) -> Contract | None:
    value = rt.state.contracts.get(digest)
    if value is None:
        return None
    try:
        return Contract.from_json(value)
    except ContractError:
        return None


def describe_model(rt: ModelRuntime) -> dict[str, Any]:
    dep = rt.deployed
    contract = rt.contract or (_recorded(rt, dep.digest) if dep else None)
    versions = []
    seen: set[tuple[str, str]] = set()
    listed = ([dep] if dep else []) + rt.state.versions()
    for d in listed:
        if (d.version, d.digest) in seen:
            continue
        seen.add((d.version, d.digest))
        known = contract if dep is not None and d == dep else _recorded(rt, d.digest)
        versions.append(
            {
                "version": d.version,
                "digest": d.digest,
                "path": d.path,
                "serving": dep is not None and d == dep,
                "inputs": [t.to_json() for t in known.inputs] if known else [],
                "outputs": [t.to_json() for t in known.outputs] if known else [],
                "batchable": known.batchable if known else None,
            }
        )
    cfg = rt.cfg
    return {
        "name": rt.name,
        "version": dep.version if dep else "",
        "digest": dep.digest if dep else "",
        "versions": versions,
        "inputs": [t.to_json() for t in contract.inputs] if contract else [],
        "outputs": [t.to_json() for t in contract.outputs] if contract else [],
        "batching": {
            "batchable": bool(contract.batchable) if contract else False,
            "max_batch": cfg.max_batch if contract is None or contract.batchable else 1,
            "max_delay_ms": float(cfg.max_delay_ms),
        },
        "devices": list(rt.devices),
        "contract_known": contract is not None,
        "contract_source": contract.source if contract else None,
        "contract_note": "" if contract else NOT_CHECKED_SERVING,
        "schema": str(schema) if (schema := rt.schemas.get(rt.serving_gen)) else None,
    }
