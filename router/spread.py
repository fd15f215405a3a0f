"""One client over many hosts: ``Client([ep1, ep2, ...])`` delegates here.

Each call goes to the next host that is up (round robin, starting at a random host so
that many clients do not move in step), over that host's own REQ socket. What can go
wrong on one host is retried on another, because inference is idempotent:

- no reply within the attempt's wait (``try_timeout``, else the whole deadline),
- the connection dropped with the request in flight (the host's process died, or ZMTP
  heartbeats stopped: the host left the network): noticed at once through the socket's
  monitor, not at the deadline,
- the host answered ``SHUTTING_DOWN`` or ``MODEL_UNAVAILABLE`` (it is going away or cannot
  serve the model): the host is taken out with back-off (see router/hosts.py),
- ``WORKER_LOST`` or ``OVERLOADED``: the host stays in, the retry goes elsewhere.

Every other answer, error or not, is the answer. The version-order promise is per host
(each host switches versions atomically, and this client talks to each host over one
connection, one request at a time); ``Result.endpoint`` says which host answered.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from router import protocol as p
from router.client_codec import Result, decode_reply, encode_request, reply_wait_s
from router.errors import PoolError, RemoteError, RequestTimeout
from router.hosts import DEFAULT_BACKOFF, Backoff, Host, HostState, Resolver, SocketOptions, expand

# The host is going away or cannot serve: take it out and ask another.
TAKE_OUT = frozenset({p.SHUTTING_DOWN, p.MODEL_UNAVAILABLE})
# The host is fine but this request did not get an answer there: ask another.
ASK_ANOTHER = frozenset({p.WORKER_LOST, p.OVERLOADED})


class SpreadClient:
    def __init__(
        self,
        entries: Sequence[str],
        *,
        retries: int,
        timeout: float,
        ctx: zmq.Context[Any],
        opts: SocketOptions,
        resolve: Resolver,
        refresh_s: float = 10.0,
        backoff: Backoff = DEFAULT_BACKOFF,
        try_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not entries:
            raise ValueError("Client needs at least one endpoint")
        self.entries = list(entries)
        self.retries = max(1, retries)
        self.timeout = timeout
        self.try_timeout = try_timeout
        self.ctx = ctx
        self.opts = opts
        self.resolve = resolve
        self.refresh_s = refresh_s
        self.backoff = backoff
        self.clock = clock
        self.hosts: dict[str, Host] = {}
        self.unresolved: list[str] = []
        self.next_refresh = 0.0
        self.turn = random.randrange(1 << 16)
        self.retried = 0  # requests asked again elsewhere (after a failure on one host)
        self.refresh()

    # -------------------------------------------------------------- host set
    def refresh(self) -> None:
        """Re-resolve the names; open hosts that appeared, close those that left. A name
        that resolves to nothing keeps its previous addresses (DNS hiccup, not a scale-in)."""
        wanted, self.unresolved = expand(self.entries, self.resolve)
        keep = set(wanted)
        if self.unresolved:
            keep |= {ep for ep in self.hosts if ep.startswith("tcp://")}
        for ep in list(self.hosts):
            if ep not in keep:
                self.hosts.pop(ep).close()
        for ep in wanted:
            if ep not in self.hosts:
                self.hosts[ep] = Host(ep, self.ctx, self.opts, self.backoff, self.clock)
        self.next_refresh = self.clock() + (self.refresh_s if self.hosts else 0.5)

    def describe(self) -> list[dict[str, Any]]:
        for h in self.hosts.values():
            h.tick()  # report what the monitors have seen by now
        return [h.describe() for h in self.hosts.values()]

    def pick(self, deadline: float, tried: set[str]) -> Host:
        """The next host to ask, preferring those this request has not tried; waits (on
        the hosts' monitors) while none is up, until ``deadline``."""
        while True:
            now = self.clock()
            if now >= self.next_refresh:
                self.refresh()
            for h in self.hosts.values():
                h.tick()
            up = [h for h in self.hosts.values() if h.eligible]
            choice = [h for h in up if h.endpoint not in tried] or up
            if choice:
                self.turn += 1
                return choice[self.turn % len(choice)]
            if now >= deadline:
                raise RequestTimeout(f"no host is answering: {self.summary()}")
            waits = [deadline - now, self.next_refresh - now]
            waits += [h.down_until - now for h in self.hosts.values() if h.state is HostState.DOWN]
            wait_s = max(0.001, min(waits))
            poller = zmq.Poller()
            for h in self.hosts.values():
                if h.monitor is not None:
                    poller.register(h.monitor, zmq.POLLIN)
            if self.hosts:
                poller.poll(int(wait_s * 1000) + 1)
            else:
                time.sleep(min(wait_s, 0.05))

    def summary(self) -> str:
        parts = [
            f"{h.endpoint} {h.state.value}" + (f" ({h.last_error})" if h.last_error else "")
            for h in self.hosts.values()
        ]
        parts += [f"{ep} (resolves to nothing)" for ep in self.unresolved]
        return ", ".join(parts) or "no endpoints"

    # ----------------------------------------------------------------- calls
    def infer(self, model: str, inputs: tuple[Any, ...], timeout: float | None, rid: Any) -> Result:
        timeout = self.timeout if timeout is None else timeout
        deadline = self.clock() + reply_wait_s(timeout)
        tried: set[str] = set()
        last: PoolError | None = None
        for attempt in range(self.retries):
            if attempt and self.clock() >= deadline:
                break  # out of time: no host is to blame for that
            if attempt:
                self.retried += 1
            host = self.pick(deadline, tried)
            tried.add(host.endpoint)
            left = deadline - self.clock()
            if left <= 0:
                break
            # The pool's own deadline is what is left of the caller's, so its
            # DEADLINE_EXCEEDED comes back before this client gives up.
            frames = encode_request(model, inputs, max(1, int(min(timeout, left) * 1000)), rid)
            wait = left if self.try_timeout is None else min(left, self.try_timeout)
            reply = self.exchange(host, frames, wait)
            if reply is None:
                last = RequestTimeout(f"{host.endpoint}: {host.last_error}", model=model)
                continue
            try:
                result = decode_reply(reply)
            except RemoteError as exc:
                if exc.code in TAKE_OUT:
                    host.fail(exc.code)
                elif exc.code in ASK_ANOTHER:
                    host.succeed()
                else:
                    host.succeed()
                    raise
                last = exc
                continue
            host.succeed()
            result.endpoint = host.endpoint
            return result
        if last is None:
            raise RequestTimeout(
                f"no answer within {timeout}s; hosts: {self.summary()}", model=model
            )
        if isinstance(last, RequestTimeout):
            raise RequestTimeout(
                f"no answer after {self.retries} tries; last: {last.message}; hosts: "
                f"{self.summary()}",
                model=model,
            )
        raise last

    def exchange(self, host: Host, frames: list[Any], wait_s: float) -> list[Any] | None:
        """Send and wait for the reply; None (and the host failed) when there is none."""
        sock, monitor = host.sock, host.monitor
        assert sock is not None and monitor is not None
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(min(wait_s, 1.0) * 1000)))
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:
            host.fail("not connected")
            return None
        end = self.clock() + wait_s
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        while True:
            left = end - self.clock()
            if left <= 0:
                host.fail(f"no reply within {wait_s:.3g}s")
                return None
            ready = dict(poller.poll(int(left * 1000) + 1))
            if sock in ready:
                return list(sock.recv_multipart(copy=False))
            if monitor in ready:
                host.tick()  # a dropped connection fails the host and replaces its socket
                if host.sock is not sock:
                    return None

    def close(self) -> None:
        for h in self.hosts.values():
            h.close()
        self.hosts.clear()
