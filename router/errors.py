"""Errors a client sees, one per wire code, so callers can catch exactly what they handle::

PoolError                       .code (wire code string), .message, .model, .version
├── RequestTimeout              no reply after every retry (client-side, code "TIMEOUT")
└── RemoteError                 the pool answered with an error
    ├── BadRequest              BAD_REQUEST, UNSUPPORTED_PROTOCOL
    ├── NoSuchModel             NO_SUCH_MODEL
    ├── ModelUnavailable        MODEL_UNAVAILABLE (model failed to start)
    ├── Overloaded              OVERLOADED        (retry later, with back-off)
    ├── DeadlineExceeded        DEADLINE_EXCEEDED
    ├── WorkerLost              WORKER_LOST       (safe to retry: inference is idempotent)
    ├── ModelError              MODEL_ERROR       (the model's forward raised)
    └── ShuttingDown            SHUTTING_DOWN
"""

from __future__ import annotations

from typing import Any

from router import protocol as p


class PoolError(Exception):
    code = "ERROR"

    def __init__(
        self, message: str, *, code: str | None = None, model: str = "", version: str = ""
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.model = model
        self.version = version

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class RequestTimeout(PoolError):
    code = "TIMEOUT"


class RemoteError(PoolError):
    code = p.INTERNAL


class BadRequest(RemoteError):
    code = p.BAD_REQUEST


class NoSuchModel(RemoteError):
    code = p.NO_SUCH_MODEL


class ModelUnavailable(RemoteError):
    code = p.MODEL_UNAVAILABLE


class Overloaded(RemoteError):
    code = p.OVERLOADED


class DeadlineExceeded(RemoteError):
    code = p.DEADLINE_EXCEEDED


class WorkerLost(RemoteError):
    code = p.WORKER_LOST


class ModelError(RemoteError):
    code = p.MODEL_ERROR


class ShuttingDown(RemoteError):
    code = p.SHUTTING_DOWN


_BY_CODE: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        NoSuchModel,
        ModelUnavailable,
        Overloaded,
        DeadlineExceeded,
        WorkerLost,
        ModelError,
        ShuttingDown,
    )
}
_BY_CODE[p.UNSUPPORTED_PROTOCOL] = BadRequest


def from_wire(error: object, model: str = "", version: str = "") -> RemoteError:
    """The exception for a reply's ``error`` map; unknown codes keep their code string."""
    code, message = p.INTERNAL, "malformed error reply"
    if isinstance(error, dict):
        code = str(error.get("code", p.INTERNAL))
        message = str(error.get("message", ""))
    cls = _BY_CODE.get(code, RemoteError)
    return cls(message, code=code, model=model, version=version)
