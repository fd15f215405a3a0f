"""The router's sockets: frontend and backend ROUTERs, and the lanes' listening socket.

Socket options, chosen on purpose:

* ROUTER_MANDATORY on the backend: a send to a worker that vanished fails instead of
  dropping the request silently, so we can re-route it. On the frontend too: a reply
  that cannot be routed tells the C core its client left, and that client's queued
  requests are dropped instead of computed for nobody.
* High-water marks are generous (our own per-model queues are the bound that matters and
  they answer OVERLOADED); a ZeroMQ HWM would drop or block without telling anyone.
  The bound on replies a client leaves unread is in bytes, kept by the C core
  (``max_unread_bytes`` per connection, ``max_unread_total_bytes`` for all): past it,
  that connection's requests are answered OVERLOADED (router/fastlane_peers.h).
* MAXMSGSIZE on the frontend caps what one client message may make libzmq allocate.
* LINGER is short so a stopping daemon flushes its last replies without hanging forever.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import zmq


def open_frontend(
    ctx: zmq.Context[Any],
    endpoint: str,
    *,
    max_message_bytes: int,
    curve_secret_key: bytes | None,
) -> zmq.Socket[Any]:
    """The clients' ROUTER, bound to ``endpoint`` (CURVE server when given a key)."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # A short accept queue: what can still be accepted once router/door.py shuts the door.
    sock.setsockopt(zmq.BACKLOG, 64)
    if curve_secret_key is not None:
        sock.curve_server = True
        sock.curve_secretkey = curve_secret_key
    sock.bind(endpoint)
    return sock


def open_backend(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    """The workers' ROUTER, bound to ``endpoint``."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    return sock


def listen_lane(path: str) -> int:
    """A listening, non-blocking unix SOCK_SEQPACKET socket at ``path`` (owner only), for
    the workers' lanes; returns its descriptor, which the caller hands to the C core."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock.detach()
