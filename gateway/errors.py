"""One table from gpu-pool's error codes to HTTP statuses and gRPC status codes.

docs/PROTOCOL.md shows the same table beside the ZeroMQ codes; a test checks that every
code in ``router.protocol.ERROR_CODES`` has a row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import grpc

from router import protocol as p

NOT_FOUND: Final = "NOT_FOUND"  # gateway-only: a model version that is not serving
UNAUTHENTICATED: Final = "UNAUTHENTICATED"  # gateway-only: missing or wrong bearer token
TIMEOUT: Final = "TIMEOUT"  # gateway-only: the router did not answer in time


@dataclass(frozen=True)
class Mapping:
    http: int
    grpc: grpc.StatusCode


STATUS: Final[dict[str, Mapping]] = {
    p.BAD_REQUEST: Mapping(400, grpc.StatusCode.INVALID_ARGUMENT),
    p.UNSUPPORTED_PROTOCOL: Mapping(400, grpc.StatusCode.INVALID_ARGUMENT),
    p.NO_SUCH_MODEL: Mapping(404, grpc.StatusCode.NOT_FOUND),
    NOT_FOUND: Mapping(404, grpc.StatusCode.NOT_FOUND),
    p.MODEL_UNAVAILABLE: Mapping(503, grpc.StatusCode.UNAVAILABLE),
    p.OVERLOADED: Mapping(429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    p.DEADLINE_EXCEEDED: Mapping(504, grpc.StatusCode.DEADLINE_EXCEEDED),
    TIMEOUT: Mapping(504, grpc.StatusCode.DEADLINE_EXCEEDED),
    p.WORKER_LOST: Mapping(503, grpc.StatusCode.UNAVAILABLE),
    p.MODEL_ERROR: Mapping(500, grpc.StatusCode.INTERNAL),
    p.SHUTTING_DOWN: Mapping(503, grpc.StatusCode.UNAVAILABLE),
    p.INTERNAL: Mapping(500, grpc.StatusCode.INTERNAL),
    UNAUTHENTICATED: Mapping(401, grpc.StatusCode.UNAUTHENTICATED),
}


class GatewayError(Exception):
    """A request the gateway answers with an error; ``code`` is a key of STATUS."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code if code in STATUS else p.INTERNAL
        self.message = message

    @property
    def http_status(self) -> int:
        return STATUS[self.code].http

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return STATUS[self.code].grpc

    def text(self) -> str:
        """The message a client sees: the stable code first, so scripts can match it."""
        return f"{self.code}: {self.message}"


def bad_request(message: str) -> GatewayError:
    return GatewayError(p.BAD_REQUEST, message)
