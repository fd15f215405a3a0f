"""One inference, whatever the protocol: names to positions, the router call, names back.

HTTP and gRPC parse their own request forms into ``NamedTensor`` lists; this module
matches input names to the model's positional ``forward(*inputs)`` by the contract's
order, sends the request through the router and names the outputs (the contract's names,
else ``output0``, ``output1``, ...). The answer carries the version that computed it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.catalog import Catalog, ModelInfo, VersionInfo
from gateway.errors import NOT_FOUND, GatewayError, bad_request
from gateway.tensors import WIRE_TO_OIP, WireTensor, oip_datatype
from gateway.upstream import RouterLink


@dataclass(frozen=True)
class NamedTensor:
    name: str
    tensor: WireTensor


@dataclass(frozen=True)
class Answer:
    model: str
    version: str  # the version that computed the outputs
    outputs: tuple[NamedTensor, ...]


def positional_names(count: int) -> list[str]:
    """The names metadata gives inputs while the pool has no contract for a model."""
    return [f"input{i}" for i in range(count)]


def order_inputs(spec: VersionInfo, given: list[NamedTensor]) -> list[WireTensor]:
    """The request's tensors in forward() order: by the contract's names; in request order
    without a contract, or when the request uses the positional names ``input0``, ...
    (what the metadata said before the contract was known, so a client that read it then
    keeps working)."""
    if not spec.inputs:
        return [n.tensor for n in given]
    if len(given) == len(spec.inputs):  # the usual request: the contract's names, in order
        ordered = []
        for n, s in zip(given, spec.inputs, strict=True):
            t = n.tensor
            if n.name != s.name or (s.datatype and WIRE_TO_OIP.get(t.dtype) != s.datatype):
                break
            ordered.append(t)
        else:
            return ordered
    expected = [s.name for s in spec.inputs]
    names = [n.name for n in given]
    if names == positional_names(len(given)) and not set(names) & set(expected):
        if len(given) != len(expected):
            raise bad_request(f"the model takes {len(expected)} inputs ({', '.join(expected)})")
        ordered = [n.tensor for n in given]
    else:
        by_name: dict[str, WireTensor] = {}
        for n in given:
            if n.name in by_name:
                raise bad_request(f"input {n.name!r} is given twice")
            by_name[n.name] = n.tensor
        unknown = [name for name in by_name if name not in expected]
        missing = [name for name in expected if name not in by_name]
        if unknown or missing:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown {', '.join(unknown)}")
            raise bad_request(f"inputs must be exactly {', '.join(expected)} ({'; '.join(parts)})")
        ordered = [by_name[name] for name in expected]
    for s, t in zip(spec.inputs, ordered, strict=True):
        want, got = s.datatype, oip_datatype(t.dtype)
        if want and got != want:
            raise bad_request(f"input {s.name!r} must be {want} (got {got})")
    return ordered


def output_names(spec: VersionInfo, count: int) -> list[str]:
    if len(spec.outputs) == count:
        return [s.name for s in spec.outputs]
    return [f"output{i}" for i in range(count)]


async def _serving(catalog: Catalog, model: str, version: str) -> tuple[ModelInfo, VersionInfo]:
    info = await catalog.model(model)
    try:
        return info, info.serving(version)
    except GatewayError as exc:
        if exc.code != NOT_FOUND:
            raise
        await catalog.refresh(force=True)  # a switch a moment ago? ask before saying no
        info = await catalog.model(model)
        return info, info.serving(version)


async def infer(
    upstream: RouterLink,
    catalog: Catalog,
    model: str,
    version: str,
    given: list[NamedTensor],
    timeout_s: float | None,
) -> Answer:
    info = catalog.cached(model)
    spec = None
    if info is not None and (not version or version == info.version):
        for v in info.versions:  # ModelInfo.serving without its exceptions: the hot path
            if v.version == info.version:
                spec = v
                break
    if info is None or spec is None:
        info, spec = await _serving(catalog, model, version)
    reply = await upstream.infer(model, order_inputs(spec, given), timeout_s)
    if not reply.ok:
        raise GatewayError(reply.code, reply.message)
    if version and reply.version != version:
        # The switch to another version happened while this request was on its way.
        raise GatewayError(
            NOT_FOUND,
            f"version {version!r} of model {model!r} stopped serving; "
            f"version {reply.version!r} is serving now",
        )
    if reply.version != spec.version:  # a switch either way: output names may differ
        try:
            spec = info.at(reply.version)  # versions already known (a rollback, a drain)
        except GatewayError:
            await catalog.refresh(force=True)  # a version new to us
            try:
                spec = (await catalog.model(model)).at(reply.version)
            except GatewayError:
                pass  # not described yet: keep the names we had
    names = output_names(spec, len(reply.outputs))
    return Answer(
        model,
        reply.version,
        tuple(NamedTensor(n, t) for n, t in zip(names, reply.outputs, strict=True)),
    )
