"""What the gateway knows about the models: OIP metadata built from poold's model contract.

poold answers two control commands the gateway uses: ``status`` (models, serving version,
state) and ``describe`` (the model contract: inputs and outputs with names, dtypes, shapes
and batch dim, per version). Both are cached for ``ttl_s`` so a busy gateway does not ask
poold on every request; a miss (a model just loaded, a version just switched) refreshes
at once. A pool without ``describe`` still serves: inputs are then taken in request
order and outputs are named ``output0``, ``output1``, ...
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from gateway.errors import NOT_FOUND, GatewayError
from gateway.tensors import oip_datatype
from router import protocol as p

log = logging.getLogger(__name__)

CTL_PROTOCOL = b"gpu-pool-ctl/1"
READY_STATES = frozenset({"serving", "upgrading"})
PLATFORM = "pytorch_torchscript"
MIN_REFRESH_S = 0.1

# A control call: (command, args) -> the result map ({"ok": bool, "data": ..., "error": str}).
ControlCall = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # OIP name: FP32, INT64, ...
    shape: tuple[int, ...]  # -1 for a dimension of any size

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class VersionInfo:
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str  # the serving version
    ready: bool
    versions: tuple[VersionInfo, ...]  # the serving version first
    described: bool  # False: poold has no contract for it (inputs taken positionally)

    def at(self, version: str) -> VersionInfo:
        """The named version's metadata ("" = the serving one); NOT_FOUND otherwise."""
        want = version or self.version
        for v in self.versions:
            if v.version == want:
                return v
        known = ", ".join(v.version for v in self.versions) or "none"
        raise GatewayError(
            NOT_FOUND, f"model {self.name!r} has no version {want!r} (known: {known})"
        )

    def serving(self, version: str) -> VersionInfo:
        """The metadata to run a request against; a version other than the serving one
        is not found (the router runs only the serving version)."""
        if version and version != self.version:
            raise GatewayError(
                NOT_FOUND,
                f"version {version!r} of model {self.name!r} is not serving; "
                f"the serving version is {self.version!r}",
            )
        return self.at(self.version)


def _specs(items: Any, prefix: str, batch_dynamic: bool) -> tuple[TensorSpec, ...]:
    out = []
    for i, item in enumerate(items or ()):
        if not isinstance(item, dict):
            continue
        shape = [int(d) for d in item.get("shape") or () if isinstance(d, int)]
        bdim = item.get("batch_dim")
        if batch_dynamic and isinstance(bdim, int) and 0 <= bdim < len(shape):
            shape[bdim] = -1  # a batching model takes any batch size there
        name = item.get("name")
        out.append(
            TensorSpec(
                name if isinstance(name, str) and name else f"{prefix}{i}",
                oip_datatype(str(item.get("dtype", ""))),
                tuple(shape),
            )
        )
    return tuple(out)


def model_info(status: dict[str, Any], contract: dict[str, Any] | None) -> ModelInfo:
    """ModelInfo from one model's entry of ``status`` and its ``describe`` data (or None)."""
    name = str(status.get("name", ""))
    serving = str(status.get("version") or "")
    ready = status.get("status") in READY_STATES
    if not contract:
        return ModelInfo(name, serving, ready, (VersionInfo(serving, (), ()),), False)
    batchable = bool((contract.get("batching") or {}).get("batchable", False))
    top = VersionInfo(
        str(contract.get("version") or serving),
        _specs(contract.get("inputs"), "input", batchable),
        _specs(contract.get("outputs"), "output", batchable),
    )
    versions = [top]
    for entry in contract.get("versions") or ():
        if isinstance(entry, dict) and str(entry.get("version")) != top.version:
            versions.append(
                VersionInfo(
                    str(entry.get("version")),
                    _specs(entry.get("inputs"), "input", batchable),
                    _specs(entry.get("outputs"), "output", batchable),
                )
            )
    return ModelInfo(name, top.version or serving, ready, tuple(versions), True)


class ControlLink:
    """Async calls to poold's control endpoint (one DEALER per call: calls are rare)."""

    def __init__(
        self, endpoint: str, curve: tuple[bytes, bytes, bytes] | None = None, timeout_s: float = 5.0
    ) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.timeout_s = timeout_s
        self.ctx = zmq.asyncio.Context.instance()

    async def __call__(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.curve
        try:
            sock.connect(self.endpoint)
            await sock.send_multipart(
                [b"", CTL_PROTOCOL, msgpack.packb({"cmd": cmd, "args": args})]
            )
            while True:
                if not await sock.poll(int(self.timeout_s * 1000)):
                    raise GatewayError(p.INTERNAL, f"poold's control endpoint did not answer {cmd}")
                frames = await sock.recv_multipart()
                msg = msgpack.unpackb(frames[-1], raw=False)
                if isinstance(msg, dict) and msg.get("type") == "result":
                    return msg
        finally:
            sock.close(linger=0)


class Catalog:
    def __init__(self, control: ControlCall, ttl_s: float = 1.0) -> None:
        self.control = control
        self.ttl_s = ttl_s
        self.models: dict[str, ModelInfo] = {}
        self.healthy = False
        self.fetched_at = -1e9
        self.has_describe = True
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def refresh(self, force: bool = False) -> None:
        """Ask poold again when the cache is ``ttl_s`` old, or at once when ``force``d
        (a miss), but never more often than every ``MIN_REFRESH_S``: a client sending
        unknown names must not turn each request into control calls."""
        asked = time.monotonic()
        age = asked - self.fetched_at
        if age < (MIN_REFRESH_S if force else self.ttl_s):
            return  # the hot path: no lock, no await
        if not force and self.models:
            # Merely old: answer from the cache and ask poold beside, so that no request
            # waits for three control calls once a second (a p99 spike per gateway).
            if self._background is None or self._background.done():
                self._background = asyncio.create_task(self._refresh_beside())
            return
        await self._refresh(asked, force)

    async def _refresh_beside(self) -> None:
        try:
            await self._refresh(time.monotonic(), False)
        except GatewayError as exc:
            self.healthy = False  # poold is not answering: not ready until it does
            log.debug("catalog refresh: %s", exc.message)

    async def _refresh(self, asked: float, force: bool) -> None:
        async with self._lock:
            if self.fetched_at >= asked:
                return  # another request refreshed while we waited for the lock
            if not force and time.monotonic() - self.fetched_at < self.ttl_s:
                return
            status = await self.control("status", {})
            health = await self.control("health", {})
            entries = (status.get("data") or {}).get("models") or []
            models = {}
            for entry in entries:
                contract = await self._describe(str(entry.get("name")))
                info = model_info(entry, contract)
                models[info.name] = info
            self.models = models
            self.healthy = bool(health.get("ok"))
            self.fetched_at = time.monotonic()

    async def _describe(self, name: str) -> dict[str, Any] | None:
        if not self.has_describe:
            return None
        result = await self.control("describe", {"model": name})
        if result.get("ok"):
            data = result.get("data")
            return data if isinstance(data, dict) else None
        if "unknown command" in str(result.get("error", "")):
            self.has_describe = False  # an older poold: fall back to positional tensors
            log.info("poold has no describe command: tensors are taken positionally")
        return None

    def cached(self, name: str) -> ModelInfo | None:
        """The hot path's lookup, no await: the cached entry (an old cache is refreshed
        beside, as ``refresh`` does), or None when only ``model`` can tell."""
        info = self.models.get(name)
        if info is not None and time.monotonic() - self.fetched_at >= self.ttl_s:
            if self._background is None or self._background.done():
                self._background = asyncio.create_task(self._refresh_beside())
        return info

    async def model(self, name: str) -> ModelInfo:
        await self.refresh()
        info = self.models.get(name)
        if info is None:  # loaded a moment ago? ask again before saying no
            await self.refresh(force=True)
            info = self.models.get(name)
        if info is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise GatewayError(p.NO_SUCH_MODEL, f"no model named {name[:64]!r}; models: {known}")
        return info

    async def ready(self) -> bool:
        try:
            await self.refresh()
        except GatewayError:
            return False
        return self.healthy
