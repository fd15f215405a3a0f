"""The OIP REST API (KServe v2), independent of the HTTP server that carries it.

``HttpApi.handle(method, path, headers, body)`` returns a ``Response``; the server
(gateway/http_server.py, http_conn.py) calls it once per complete request, after it has
checked the body against the size limit, with the headers it reads lower-cased.

Routes::

    GET  /v2/health/live | /v2/health/ready            200, or 503 when not ready
    GET  /v2                                           server metadata
    GET  /v2/models/{name}[/versions/{v}]              model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready        200, or 503 when not ready
    POST /v2/models/{name}[/versions/{v}]/infer        inference (JSON or binary tensors)

The binary tensor data extension: with ``Inference-Header-Content-Length: N`` the body's
first N bytes are the JSON request and the rest is raw tensor bytes, one input after the
other for each input whose parameters carry ``binary_data_size``. Outputs come back the
same way when the output (``binary_data``) or the request (``binary_data_output``) asks.
"""

from __future__ import annotations

import hmac
import json
import re
import zlib
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any

from gateway import inference, tensors
from gateway.catalog import PLATFORM, Catalog
from gateway.errors import UNAUTHENTICATED, GatewayError, bad_request
from gateway.stats import Stats
from gateway.upstream import RouterLink
from router import protocol as p

HEADER_LENGTH = "inference-header-content-length"
HEADER_LENGTH_BYTES = HEADER_LENGTH.encode()
EXTENSIONS = ("binary_tensor_data", "model_version")

# One encoder for every answer: json.dumps with any non-default option builds a new
# JSONEncoder per call, a few microseconds of the hot path.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_DECODE = json.JSONDecoder().decode
_QUOTE = encode_basestring_ascii  # a JSON string literal, as the encoder writes it

_MODEL_PATH = re.compile(
    r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<tail>/ready|/infer)?"
)


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def _json(status: int, obj: Any) -> Response:
    return Response(
        status,
        _ENCODE(obj).encode(),
        [(b"content-type", b"application/json")],
    )


def _error(exc: GatewayError) -> Response:
    return _json(exc.http_status, {"error": exc.text()})


class HttpApi:
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

    async def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Response:
        try:
            if path.startswith("/v2/health/"):
                return await self._health(method, path)
            self._authorize(headers)
            if path in ("/v2", "/v2/"):
                self._method(method, "GET")
                return _json(
                    200,
                    {
                        "name": "gpu-pool",
                        "version": self.server_version,
                        "extensions": list(EXTENSIONS),
                    },
                )
            m = _MODEL_PATH.fullmatch(path)
            if m is None:
                return _json(404, {"error": f"NOT_FOUND: no route {path[:100]}"})
            name, version, tail = m["name"], m["version"] or "", m["tail"] or ""
            if tail == "/infer":
                self._method(method, "POST")
                return await self._infer(name, version, headers, body)
            self._method(method, "GET")
            info = await self.catalog.model(name)
            if tail == "/ready":
                ready = info.ready and (not version or version == info.version)
                return Response(200 if ready else 503)
            meta = info.at(version)
            return _json(
                200,
                {
                    "name": info.name,
                    "versions": [v.version for v in info.versions],
                    "platform": PLATFORM,
                    "inputs": [s.to_json() for s in meta.inputs],
                    "outputs": [s.to_json() for s in meta.outputs],
                },
            )
        except GatewayError as exc:
            return _error(exc)

    async def _health(self, method: str, path: str) -> Response:
        self._method(method, "GET")
        if path == "/v2/health/live":
            return Response(200)
        if path == "/v2/health/ready":
            return Response(200 if await self.catalog.ready() else 503)
        return _json(404, {"error": f"NOT_FOUND: no route {path[:100]}"})

    @staticmethod
    def _method(got: str, want: str) -> None:
        if got != want and not (want == "GET" and got == "HEAD"):
            raise GatewayError(p.BAD_REQUEST, f"use {want} here (got {got[:10]})")

    def _authorize(self, headers: dict[str, str]) -> None:
        if not self.token:
            return
        given = headers.get("authorization", "")
        if not (
            given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.token)
        ):
            raise GatewayError(UNAUTHENTICATED, "missing or wrong bearer token")

    async def _infer(
        self, model: str, version: str, headers: dict[str, str], body: bytes
    ) -> Response:
        code = "OK"
        self.stats.begin("http")
        t0 = self.stats.now()
        try:
            body = _decode_body(headers.get("content-encoding", ""), body)
            request, binary = _split(headers.get(HEADER_LENGTH), body)
            given = _inputs(request, binary)
            params = request.get("parameters") or {}
            timeout_us = params.get("timeout") if isinstance(params, dict) else None
            timeout_s = timeout_us / 1e6 if isinstance(timeout_us, int) and timeout_us > 0 else None
            answer = await inference.infer(
                self.upstream, self.catalog, model, version, given, timeout_s
            )
            return _render(request, answer)
        except GatewayError as exc:
            code = exc.code
            return _error(exc)
        finally:
            self.stats.end("http", model, code, t0)


def _decode_body(encoding: str, body: bytes) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    try:
        if encoding == "gzip":
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            return zlib.decompress(body)
    except zlib.error as exc:
        raise bad_request(f"body is not valid {encoding}: {exc}") from None
    raise bad_request(f"Content-Encoding {encoding[:20]!r} is not supported (gzip, deflate)")


def _split(header_length: str | None, body: bytes) -> tuple[dict[str, Any], memoryview]:
    """(JSON request, binary section) of a body, per Inference-Header-Content-Length."""
    if header_length is None:
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise bad_request("Inference-Header-Content-Length must be an integer") from None
        if not 0 <= n <= len(body):
            raise bad_request(f"Inference-Header-Content-Length {n} exceeds the body ({len(body)})")
    view = memoryview(body)
    raw = view[:n].tobytes() if header_length is not None else body
    try:
        try:
            request = _DECODE(raw.decode())  # UTF-8, as every client sends it
        except UnicodeDecodeError:
            request = json.loads(raw)  # UTF-16/32, which json.loads recognises
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise bad_request("request must be a JSON object")
    return request, view[n:]


def _inputs(request: dict[str, Any], binary: memoryview) -> list[inference.NamedTensor]:
    items = request.get("inputs")
    if not isinstance(items, list) or not items:
        raise bad_request("inputs must be a non-empty list")
    if len(items) > p.MAX_INPUTS:
        raise bad_request(f"at most {p.MAX_INPUTS} inputs")
    out, offset = [], 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad_request(f"inputs[{i}] must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"inputs[{i}].name must be a non-empty string")
        try:
            dtype = tensors.wire_dtype(item.get("datatype"))
            shape = tensors.check_shape(item.get("shape"))
            params = item.get("parameters") or {}
            size = params.get("binary_data_size") if isinstance(params, dict) else None
            if size is not None:
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise tensors.TensorError("binary_data_size must be a non-negative integer")
                if offset + size > len(binary):
                    raise tensors.TensorError(
                        f"binary_data_size {size} runs past the body's binary data"
                    )
                t = tensors.from_bytes(dtype, shape, binary[offset : offset + size])
                offset += size
            elif "data" in item:
                t = tensors.from_values(dtype, shape, item["data"])
            else:
                raise tensors.TensorError("needs data or parameters.binary_data_size")
        except tensors.TensorError as exc:
            raise bad_request(f"input {name!r}: {exc}") from None
        out.append(inference.NamedTensor(name, t))
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data belong to no input")
    return out


def _wants_binary(request: dict[str, Any]) -> tuple[bool, dict[str, bool] | None]:
    """(default for every output, {name: binary} for the outputs asked for, or None = all)."""
    params = request.get("parameters") or {}
    default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    asked = request.get("outputs")
    if asked is None:
        return default, None
    if not isinstance(asked, list):
        raise bad_request("outputs must be a list")
    chosen: dict[str, bool] = {}
    for i, item in enumerate(asked):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad_request(f"outputs[{i}] must be an object with a name")
        oparams = item.get("parameters") or {}
        binary = oparams.get("binary_data", default) if isinstance(oparams, dict) else default
        chosen[item["name"]] = bool(binary)
    return default, chosen


def _render(request: dict[str, Any], answer: inference.Answer) -> Response:
    default, chosen = _wants_binary(request)
    outputs = answer.outputs
    if chosen is not None:
        known = {o.name: o for o in outputs}
        missing = [n for n in chosen if n not in known]
        if missing:
            raise bad_request(f"unknown output {', '.join(missing)}; outputs: {', '.join(known)}")
        outputs = tuple(known[n] for n in chosen)
    rid = request.get("id")
    if default and chosen is None:  # all outputs binary, the usual binary request
        return _render_binary(answer, outputs, rid if isinstance(rid, str) else None)
    body: dict[str, Any] = {"model_name": answer.model, "model_version": answer.version}
    if isinstance(rid, str):
        body["id"] = rid
    rendered, chunks = [], []
    for o in outputs:
        t = o.tensor
        entry: dict[str, Any] = {
            "name": o.name,
            "datatype": tensors.oip_datatype(t.dtype),
            "shape": list(t.shape),
        }
        if (chosen or {}).get(o.name, default):
            entry["parameters"] = {"binary_data_size": len(t.data)}
            chunks.append(t.data)
        else:
            entry["data"] = tensors.to_list(t)
        rendered.append(entry)
    body["outputs"] = rendered
    head = _ENCODE(body).encode()
    if not chunks:
        return Response(200, head, [(b"content-type", b"application/json")])
    return Response(
        200,
        b"".join([head, *chunks]),
        [
            (b"content-type", b"application/octet-stream"),
            (HEADER_LENGTH.encode(), str(len(head)).encode()),
        ],
    )


def _render_binary(
    answer: inference.Answer, outputs: tuple[inference.NamedTensor, ...], rid: str | None
) -> Response:
    """``_render``'s answer when every output goes as binary data, written as text
    directly (same JSON, same key order): no dicts to build and walk per request."""
    parts = [f'{{"model_name":{_QUOTE(answer.model)},"model_version":{_QUOTE(answer.version)}']
    if rid is not None:
        parts.append(f',"id":{_QUOTE(rid)}')
    entries = []
    for o in outputs:
        t = o.tensor
        dims = ",".join(map(str, t.shape))
        datatype = tensors.WIRE_TO_OIP.get(t.dtype) or tensors.oip_datatype(t.dtype)
        entries.append(
            f'{{"name":{_QUOTE(o.name)},"datatype":{_QUOTE(datatype)},"shape":[{dims}],'
            f'"parameters":{{"binary_data_size":{len(t.data)}}}}}'
        )
    parts.append(f',"outputs":[{",".join(entries)}]}}')
    head = "".join(parts).encode()
    return Response(
        200,
        b"".join([head, *(o.tensor.data for o in outputs)]),
        [
            (b"content-type", b"application/octet-stream"),
            (HEADER_LENGTH_BYTES, str(len(head)).encode()),
        ],
    )
