"""A hand-written systemd notify client (``sd_notify(3)``) for ``Type=notify`` units.

The protocol is one datagram per message, sent over an ``AF_UNIX``/``SOCK_DGRAM`` socket
named by ``$NOTIFY_SOCKET``; the payload is newline-separated ``KEY=VALUE`` assignments::

    READY=1\\nSTATUS=serving 3 models\\n

``$NOTIFY_SOCKET`` is either a filesystem path or, when it starts with ``@``, a name in
the Linux abstract socket namespace (the ``@`` stands for a leading NUL byte).

Failures are logged, never raised: a daemon that serves traffic must not die because
systemd restarted or the socket vanished. Without ``$NOTIFY_SOCKET`` (a terminal, a test,
a container without systemd) every call is a cheap no-op.

Typical use in the daemon's loop::

    notifier = Notifier.from_env()
    interval = watchdog_interval()          # None: no WatchdogSec= configured
    ...                                     # load models, bind sockets
    notifier.ready(status="serving 2 models")
    while running:
        ...
        if interval is not None and now >= next_ping:
            notifier.watchdog()             # from the loop itself: proves the loop turns
            next_ping = now + interval
    notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]

log = logging.getLogger(__name__)

# systemd accepts upper-case assignments; anything else is a bug in the caller.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*\Z")

# A datagram send to a live systemd never blocks for long; bound it anyway so a wedged
# manager can't stall the event loop for more than this.
_SEND_TIMEOUT_S = 1.0


def _encode_address(address: str) -> bytes:
    """Turn a ``$NOTIFY_SOCKET`` value into the ``sockaddr_un`` path bytes."""
    if address.startswith("@"):
        # Abstract namespace: the kernel expects a leading NUL, not '@'.
        return b"\0" + os.fsencode(address[1:])
    return os.fsencode(address)


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    # A newline would start a new assignment; STATUS text is free-form, so flatten it.
    return str(value).replace("\n", " ")


class Notifier:
    """Sends state notifications to the service manager; a no-op when not under systemd.

    ``Notifier(address)`` takes the raw ``$NOTIFY_SOCKET`` value (``None`` or ``""``:
    disabled); :meth:`from_env` reads it from the environment. Unsupported addresses
    (``vsock:``, relative paths) disable the notifier with a warning.
    """

    def __init__(self, address: str | None) -> None:
        self._address: bytes | None = None
        self._sock: socket.socket | None = None
        # Log the first failure of an outage at WARNING, the rest at DEBUG, so a dead
        # manager can't flood the journal with a line per watchdog ping.
        self._failing = False
        if not address:
            return
        if not (address.startswith("/") or address.startswith("@")):
            log.warning("NOTIFY_SOCKET=%r is not supported; systemd notify disabled", address)
            return
        self._address = _encode_address(address)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, unset: bool = False
    ) -> Notifier:
        """Build from ``$NOTIFY_SOCKET``.

        ``unset=True`` removes the variable from ``os.environ`` so that worker processes
        started later don't inherit it (with ``NotifyAccess=main`` systemd would ignore
        them anyway, but a child should not be able to pretend to be the daemon).
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        if unset:
            os.environ.pop("NOTIFY_SOCKET", None)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: object) -> bool:
        """Send one datagram with ``KEY=VALUE`` lines in argument order.

        Returns True when the datagram was handed to the kernel, False when disabled or
        when sending failed (already logged). Raises ``ValueError`` only for a malformed
        field name, which is a programming error, not a runtime condition.
        """
        for name in fields:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"invalid sd_notify field name {name!r}")
        if self._address is None or not fields:
            return False
        payload = "".join(f"{k}={_format_value(v)}\n" for k, v in fields.items())
        try:
            sock = self._sock
            if sock is None:
                # One socket for the daemon's lifetime; created lazily so a disabled or
                # never-used notifier holds no descriptor. Python sockets are CLOEXEC.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(_SEND_TIMEOUT_S)
                self._sock = sock
            sock.sendto(payload.encode("utf-8"), self._address)
        except OSError as exc:
            self._report_failure(exc)
            return False
        if self._failing:
            log.info("systemd notify socket reachable again")
            self._failing = False
        return True

    def _report_failure(self, exc: OSError) -> None:
        if self._failing:
            log.debug("sd_notify failed again: %s", exc)
            return
        self._failing = True
        log.warning("sd_notify to %r failed (further failures logged at DEBUG): %s",
                    self._address, exc)

    # Convenience wrappers for the messages a supervisor needs. ``status`` may ride along
    # with any state change so that `systemctl status` says why.

    def ready(self, status: str | None = None) -> bool:
        """Startup finished: systemd now considers the unit active."""
        return self._send_with_status(status, READY=1)

    def status(self, text: str) -> bool:
        """Free-form one-line state shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec=``; send it from the loop that does the work."""
        return self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began (draining); systemd stops expecting watchdog pings."""
        return self._send_with_status(status, STOPPING=1)

    def reloading(self, status: str | None = None) -> bool:
        """A reload began; send :meth:`ready` when it is done.

        systemd 253+ wants ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, which is what
        ``time.monotonic_ns`` reads on Linux) beside ``RELOADING=1`` to order the reload
        against the ``READY=1`` that ends it.
        """
        now_usec = time.monotonic_ns() // 1000
        return self._send_with_status(status, RELOADING=1, MONOTONIC_USEC=now_usec)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time in the current start/stop phase (slow model loads, long drains)."""
        return self.send(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    def _send_with_status(self, status: str | None, **fields: object) -> bool:
        if status is not None:
            fields["STATUS"] = status
        return self.send(**fields)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between watchdog pings, or None when the watchdog is off for this process.

    Half of ``$WATCHDOG_USEC``, the margin ``sd_watchdog_enabled(3)`` recommends. When
    ``$WATCHDOG_PID`` is set it must name this process: a child that inherited the
    variables must not ping on its parent's behalf.
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", raw_usec)
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            owner = int(raw_pid)
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID=%r", raw_pid)
            return None
        if owner != (os.getpid() if pid is None else pid):
            return None
    return usec / 2_000_000
