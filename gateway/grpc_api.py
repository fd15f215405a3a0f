"""The OIP gRPC service, ``inference.GRPCInferenceService``, on grpc.aio.

Requests carry tensors either as typed ``contents`` or, as tritonclient sends them, as
``raw_input_contents`` (one bytes entry per input, in order), which ModelInfer's own
deserializer (gateway/grpc_wire.py) leaves as views of the received bytes. Answers use
``raw_output_contents``: the output bytes pass through from the worker without a copy
into typed lists, and every OIP client reads them.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

import grpc

from gateway import inference, tensors
from gateway.catalog import PLATFORM, Catalog
from gateway.errors import UNAUTHENTICATED, GatewayError, bad_request
from gateway.grpc_wire import InferCall, parse_infer_request
from gateway.http_api import EXTENSIONS
from gateway.proto import grpc_predict_v2_pb2 as pb
from gateway.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from gateway.stats import Stats
from gateway.upstream import RouterLink

# Which typed contents field carries each wire dtype (the protocol's table).
CONTENTS_FIELD = {
    "bool": "bool_contents",
    "uint8": "uint_contents",
    "int8": "int_contents",
    "int16": "int_contents",
    "int32": "int_contents",
    "int64": "int64_contents",
    "float32": "fp32_contents",
    "float64": "fp64_contents",
}


def _param(params: Any, key: str) -> Any:
    if key not in params:
        return None
    value = params[key]
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice else None


def request_inputs(
    request: pb.ModelInferRequest, raw: Sequence[bytes | memoryview]
) -> list[inference.NamedTensor]:
    """The request's tensors; ``raw``: its raw_input_contents (InferCall.raw)."""
    if not request.inputs:
        raise bad_request("inputs must be a non-empty list")
    if raw and len(raw) != len(request.inputs):
        raise bad_request(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    out = []
    for i, item in enumerate(request.inputs):
        try:
            dtype = tensors.wire_dtype(item.datatype)
            shape = tensors.check_shape(tuple(item.shape))
            if raw:
                t = tensors.from_bytes(dtype, shape, raw[i])  # a view: no copy
            else:
                fname = CONTENTS_FIELD.get(dtype)
                if fname is None:
                    raise tensors.TensorError(
                        f"{item.datatype} has no typed contents; send raw_input_contents"
                    )
                t = tensors.from_values(dtype, shape, list(getattr(item.contents, fname)))
        except tensors.TensorError as exc:
            raise bad_request(f"input {item.name!r}: {exc}") from None
        out.append(inference.NamedTensor(item.name, t))
    return out


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        upstream: RouterLink,
        catalog: Catalog,
        stats: Stats,
        *,
        token: str = "",
        server_version: str = "",
    ) -> None:
        self.upstream = upstream
        self.catalog = catalog
        self.stats = stats
        self.token = token.encode()
        self.server_version = server_version

    async def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not self.token:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not (
            isinstance(given, str)
            and given.startswith("Bearer ")
            and hmac.compare_digest(given[7:].encode(), self.token)
        ):
            await self._abort(
                context, GatewayError(UNAUTHENTICATED, "missing or wrong bearer token")
            )

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: GatewayError) -> None:
        await context.abort(exc.grpc_status, exc.text())

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=await self.catalog.ready())

    async def ModelReady(  # noqa: N802
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        await self._authorize(context)
        try:
            info = await self.catalog.model(request.name)
        except GatewayError as exc:
            await self._abort(context, exc)
            raise
        ready = info.ready and (not request.version or request.version == info.version)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:  # noqa: N802
        await self._authorize(context)
        return pb.ServerMetadataResponse(
            name="gpu-pool", version=self.server_version, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        await self._authorize(context)
        try:
            info = await self.catalog.model(request.name)
            meta = info.at(request.version)
        except GatewayError as exc:
            await self._abort(context, exc)
            raise

        def spec(s: Any) -> pb.ModelMetadataResponse.TensorMetadata:
            return pb.ModelMetadataResponse.TensorMetadata(
                name=s.name, datatype=s.datatype, shape=list(s.shape)
            )

        return pb.ModelMetadataResponse(
            name=info.name,
            versions=[v.version for v in info.versions],
            platform=PLATFORM,
            inputs=[spec(s) for s in meta.inputs],
            outputs=[spec(s) for s in meta.outputs],
        )

    async def ModelInfer(  # noqa: N802
        self, call: InferCall, context: Any
    ) -> pb.ModelInferResponse:
        if self.token:
            await self._authorize(context)
        self.stats.begin("grpc")
        t0 = self.stats.now()
        code = "OK"
        request = call.message
        try:
            given = request_inputs(request, call.raw)
            timeout_s = _timeout(request, context)
            answer = await inference.infer(
                self.upstream,
                self.catalog,
                request.model_name,
                request.model_version,
                given,
                timeout_s,
            )
            outputs = answer.outputs
            if request.outputs:
                known = {o.name: o for o in outputs}
                missing = [o.name for o in request.outputs if o.name not in known]
                if missing:
                    raise bad_request(
                        f"unknown output {', '.join(missing)}; outputs: {', '.join(known)}"
                    )
                outputs = tuple(known[o.name] for o in request.outputs)
            return _response(answer, request.id, outputs)
        except GatewayError as exc:
            code = exc.code
            await self._abort(context, exc)
            raise
        finally:
            self.stats.end("grpc", request.model_name, code, t0)


def _response(
    answer: inference.Answer, rid: str, outputs: tuple[inference.NamedTensor, ...]
) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=answer.model, model_version=answer.version, id=rid)
    add_output, raw = resp.outputs.add, resp.raw_output_contents
    for o in outputs:
        t = o.tensor
        add_output(
            name=o.name,
            datatype=tensors.WIRE_TO_OIP.get(t.dtype) or tensors.oip_datatype(t.dtype),
            shape=t.shape,
        )
        # bytes as they came from the router; a view of its read (a large output) is
        # copied once here, into the message (the protobuf keeps its own copy anyway)
        raw.append(t.data if isinstance(t.data, bytes) else bytes(t.data))
    return resp


def _timeout(request: pb.ModelInferRequest, context: Any) -> float | None:
    """The request's deadline: the smaller of its ``timeout`` parameter (µs, as Triton's)
    and the gRPC deadline the client set."""
    candidates = []
    us = _param(request.parameters, "timeout")
    if isinstance(us, int) and not isinstance(us, bool) and us > 0:
        candidates.append(us / 1e6)
    remaining = context.time_remaining()
    if remaining is not None:
        candidates.append(max(0.001, remaining))
    return min(candidates) if candidates else None


SERVICE = "inference.GRPCInferenceService"
# method -> (request type, response type): the generated registration's table
METHODS: dict[str, tuple[Any, Any]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}


def add_to_server(server: grpc.aio.Server, service: InferenceService) -> None:
    """What ``add_GRPCInferenceServiceServicer_to_server`` does, but ModelInfer's request
    is read by ``parse_infer_request`` (raw inputs as views, not copies)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=parse_infer_request
            if name == "ModelInfer"
            else request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
        for name, (request_type, response_type) in METHODS.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
