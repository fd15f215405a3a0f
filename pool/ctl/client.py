"""Talking to poold's control endpoint (used by pool-ctl, the stress script and tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from pool.ctl.endpoint import NotListening, probe

CTL_PROTOCOL = b"gpu-pool-ctl/1"
Progress = Callable[[dict[str, Any]], None]


class Unreachable(Exception):
    """poold is not there or did not answer: pool-ctl exits 3."""


class ControlClient:
    def __init__(
        self,
        endpoint: str,
        *,
        connect_timeout_s: float = 5.0,
        server_key: bytes | None = None,
        client_keys: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self.server_key = server_key
        self.client_keys = client_keys

    def call(
        self,
        cmd: str,
        args: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        progress: Progress | None = None,
        on_interrupt: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Send one command; return its result map. ``progress`` sees progress maps.

        With ``on_interrupt``, a first Ctrl-C calls it (pool-ctl sends ``cancel``) and
        the wait for the result goes on; a second one raises KeyboardInterrupt."""
        try:
            probe(self.endpoint)  # a stale or forbidden socket fails now, not after a timeout
        except NotListening as exc:
            raise Unreachable(str(exc)) from None
        ctx: zmq.Context[Any] = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.server_key is not None and self.client_keys is not None:
            sock.curve_serverkey = self.server_key
            sock.curve_publickey, sock.curve_secretkey = self.client_keys
        try:
            sock.connect(self.endpoint)
            sock.send_multipart(
                [b"", CTL_PROTOCOL, msgpack.packb({"cmd": cmd, "args": args or {}})]
            )
            # The first message must come quickly; an upgrade then streams progress for as
            # long as it takes, bounded by the caller's timeout.
            wait = self.connect_timeout_s
            end = time.monotonic() + (
                timeout_s if timeout_s is not None else self.connect_timeout_s
            )
            first = True
            while True:
                budget = min(wait, end - time.monotonic()) if not first else wait
                try:
                    answered = budget > 0 and bool(sock.poll(int(budget * 1000)))
                except KeyboardInterrupt:
                    if on_interrupt is None:
                        raise
                    handler, on_interrupt = on_interrupt, None
                    handler()
                    continue
                if not answered:
                    if first:
                        raise Unreachable(
                            f"poold at {self.endpoint} did not answer within "
                            f"{self.connect_timeout_s:.0f}s"
                        )
                    raise TimeoutError(f"no result from poold within {timeout_s}s")
                first = False
                wait = max(1.0, end - time.monotonic())
                frames = sock.recv_multipart()
                msg = msgpack.unpackb(frames[-1], raw=False)
                if msg.get("type") == "progress":
                    if progress is not None:
                        progress(msg)
                    continue
                return dict(msg)
        finally:
            sock.close(linger=0)
