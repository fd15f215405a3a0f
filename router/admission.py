"""What Python decides for a client request the C core punted to it.

The C core routes every request whose header its strict check accepts; the rest come
here whole. ``admit`` judges one such request the way ``router.protocol`` reads it and
returns a typed decision: either the request is queued like any other (the C check is
stricter than Python's, so a header only Python can judge is served the same way), or
it is refused with an error header that echoes its ``id`` when that is readable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from router import protocol as p
from router.table import ModelRoute


@dataclass(frozen=True)
class Admitted:
    """Queue it: ``body`` is the header frame onwards, ``timeout_s`` its deadline's span."""

    route: ModelRoute
    body: list[bytes]
    timeout_s: float


@dataclass(frozen=True)
class Refused:
    """Answer it at once with ``header``. ``model`` labels the metrics: "" when the name
    is unknown or unreadable (clients choose names; counting them would be unbounded)."""

    model: str
    code: str
    header: bytes


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(envelope, body). The envelope is the identity, then the empty delimiter REQ
    sockets add; a DEALER client that skips the delimiter is served too (its next frame
    is the protocol id)."""
    if len(frames) >= 2 and len(frames[1]) == 0:
        return frames[:2], frames[2:]
    return frames[:1], frames[1:]


def admit(
    body: list[bytes],
    routes: Mapping[str, ModelRoute],
    accepting: bool,
    queued: Callable[[ModelRoute], int],
) -> Admitted | Refused:
    """Judge one punted request. ``queued(route)`` is how many of the route's requests
    wait in the C core; it is asked only once the request is otherwise acceptable."""
    try:
        if len(body) < 2:
            raise p.ProtocolError(p.BAD_REQUEST, "expected protocol id and header frames")
        p.check_protocol(body[0])
        header = p.unpack_map(body[1])
        model, timeout_ms, client_id = p.route_fields(header)
    except p.ProtocolError as exc:
        return Refused("", exc.code, p.error_header(exc.code, exc.message, rid=readable_id(body)))
    route = routes.get(model)
    if route is None:
        msg = f"no model named {model!r}; serving: {', '.join(sorted(routes)) or 'none'}"
        return Refused("", p.NO_SUCH_MODEL, p.error_header(p.NO_SUCH_MODEL, msg, rid=client_id))
    if not accepting:
        return Refused(
            model,
            p.SHUTTING_DOWN,
            p.error_header(
                p.SHUTTING_DOWN, "the pool is shutting down", model=model, rid=client_id
            ),
        )
    if route.unavailable is not None:
        return Refused(
            model,
            p.MODEL_UNAVAILABLE,
            p.error_header(p.MODEL_UNAVAILABLE, route.unavailable, model=model, rid=client_id),
        )
    timeout = timeout_ms / 1000.0 if timeout_ms else route.timeout_s
    waiting = queued(route)
    if waiting >= route.max_queue and not any(s.load < s.credit for s in route.active):
        return Refused(
            model,
            p.OVERLOADED,
            p.error_header(
                p.OVERLOADED,
                f"model {model!r} has {waiting} requests waiting (max_queue)",
                model=model,
                rid=client_id,
            ),
        )
    return Admitted(route, body[1:], timeout)


def readable_id(body: list[bytes]) -> Any:
    """The request's ``id`` when its header can be read, even though the request was
    refused (another protocol version, a malformed key): every error reply whose header
    was readable echoes it (docs/PROTOCOL.md)."""
    if len(body) < 2:
        return None
    try:
        rid = p.unpack_map(body[1]).get("id")
    except p.ProtocolError:
        return None
    return rid if rid is not None and p._valid_id(rid) else None
