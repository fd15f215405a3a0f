"""The Python client: ``Client(endpoint).infer(model, *inputs, timeout=s)``.

Any language can do the same with a REQ socket and msgpack (see docs/PROTOCOL.md); this
one adds the ZeroMQ guide's lazy-pirate retry: when no reply comes in time it closes the
socket (a REQ socket is stuck after an unanswered send), opens a new one and resends, a
bounded number of times. Inference is idempotent, so a resend is safe.

``Client([ep1, ep2, ...])`` (a list, even of one) spreads calls over many hosts, and a
``tcp://NAME:PORT`` entry stands for every address NAME resolves to (a Kubernetes
headless Service): see router/spread.py for how hosts are taken out and requests retried
elsewhere. ``Client(endpoint)`` with one string is the one-host client, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

from router.client_codec import (  # noqa: F401  (re-exported: callers import them from here)
    Result,
    _as_array,
    _to_numpy,
    decode_reply,
    encode_request,
    reply_wait_s,
)
from router.errors import RequestTimeout
from router.hosts import DEFAULT_BACKOFF, Backoff, Resolver, SocketOptions, getaddrinfo_resolver
from router.spread import SpreadClient


class Client:
    def __init__(
        self,
        endpoint: str | Sequence[str],
        *,
        retries: int = 3,
        timeout: float = 30.0,
        context: zmq.Context[Any] | None = None,
        curve_server_key: bytes | None = None,
        curve_keys: tuple[bytes, bytes] | None = None,
        try_timeout: float | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        resolve: Resolver = getaddrinfo_resolver,
        refresh_s: float = 10.0,
    ) -> None:
        """``endpoint``: one ZeroMQ endpoint, or a list of them (many hosts).

        Many-host options: ``try_timeout`` bounds the wait for one host's reply before the
        request is asked elsewhere (default: the whole deadline; a dead host is noticed
        sooner anyway, see router/spread.py); ``backoff`` how long a failed host stays
        out; ``resolve`` turns a name into addresses; ``refresh_s`` how often names are
        resolved again.
        """
        self.retries = retries
        self.timeout = timeout
        self.ctx = context or zmq.Context.instance()
        self.curve_server_key = curve_server_key
        self.curve_keys = curve_keys
        self.sock: zmq.Socket[Any] | None = None
        self.spread: SpreadClient | None = None
        if isinstance(endpoint, str):
            self.endpoint = endpoint
        else:
            self.endpoint = ",".join(endpoint)
            opts = SocketOptions(curve_server_key, curve_keys)
            self.spread = SpreadClient(
                list(endpoint),
                retries=retries,
                timeout=timeout,
                ctx=self.ctx,
                opts=opts,
                resolve=resolve,
                refresh_s=refresh_s,
                backoff=backoff,
                try_timeout=try_timeout,
            )

    def hosts(self) -> list[dict[str, Any]]:
        """Each host's endpoint and state (many-host client only; else one entry)."""
        if self.spread is None:
            return [{"endpoint": self.endpoint, "state": "single"}]
        return self.spread.describe()

    def _socket(self) -> zmq.Socket[Any]:
        if self.sock is None:
            s = self.ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            if self.curve_server_key is not None and self.curve_keys is not None:
                s.curve_serverkey = self.curve_server_key
                s.curve_publickey, s.curve_secretkey = self.curve_keys
            s.connect(self.endpoint)
            self.sock = s
        return self.sock

    def _reset(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def infer(
        self, model: str, *inputs: Any, timeout: float | None = None, id: Any = None
    ) -> Result:
        """Run ``model.forward(*inputs)`` in the pool; raises a PoolError subclass on error."""
        if self.spread is not None:
            return self.spread.infer(model, inputs, timeout, id)
        timeout = self.timeout if timeout is None else timeout
        frames = encode_request(model, inputs, int(timeout * 1000), id)
        # Wait a little past the deadline the pool enforces, so that its
        # DEADLINE_EXCEEDED answer arrives instead of a client-side timeout.
        wait_ms = int(reply_wait_s(timeout) * 1000)
        for _attempt in range(max(1, self.retries)):
            sock = self._socket()
            # A send blocks while no peer can take it (say, a CURVE handshake that the
            # pool refused tore the connection down): bounded by the same wait.
            sock.setsockopt(zmq.SNDTIMEO, wait_ms)
            try:
                sock.send_multipart(frames, copy=False)
            except zmq.Again:
                self._reset()
                continue
            if sock.poll(wait_ms):
                result = decode_reply(sock.recv_multipart(copy=False))
                result.endpoint = self.endpoint
                return result
            self._reset()  # lazy pirate: a REQ socket without its reply is unusable
        raise RequestTimeout(
            f"no reply from {self.endpoint} after {self.retries} tries of {timeout}s", model=model
        )

    def close(self) -> None:
        self._reset()
        if self.spread is not None:
            self.spread.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
