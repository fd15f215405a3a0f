"""The daemon's small HTTP side door: Prometheus metrics and health probes.

    GET /metrics   200, OpenMetrics if the Accept header asks, else Prometheus text 0.0.4;
                   with a token (pool.metrics_token_file): 401 unless the request says
                   "Authorization: Bearer <token>"
    GET /healthz   liveness:  200 "ok" when health()[0], else 503
    GET /readyz    readiness: 200 when health()[1], else 503; body is health()[2]
    anything else  404 (other methods: 405)

It runs a ``ThreadingHTTPServer`` in a daemon thread so a slow scraper never touches the
event loop. ``health`` is called from that thread: it must only read state the loop
publishes (an attribute holding an immutable value), never mutate it.

The probes stay open with a token: kubelet and systemd probes send no credentials, and
they tell only "ok" or why not ready. No TLS here: a scraper across an untrusted network
goes through a TLS proxy (the token then stops whoever else reaches the port).
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from pool.metrics import PoolMetrics

__all__ = ["HealthCheck", "HttpEndpoint", "parse_address", "serve_http"]

log = logging.getLogger(__name__)

# (alive, ready, reason): reason is a short human-readable line for /readyz.
HealthCheck = Callable[[], tuple[bool, bool, str]]

# A client that opens a connection and sends nothing must not hold a thread forever.
_REQUEST_TIMEOUT_S = 10.0


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6; empty host = all interfaces)."""
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ValueError(f"metrics address {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"metrics address {address!r} has a bad port") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics address {address!r} has a port out of range")
    return host, port


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Restarting poold must be able to rebind at once, TIME_WAIT or not.
    allow_reuse_address = True

    def __init__(
        self,
        addr: tuple[str, int],
        family: socket.AddressFamily,
        metrics: PoolMetrics,
        health: HealthCheck,
        token: str,
    ) -> None:
        self.address_family = family
        self.metrics = metrics
        self.health = health
        self.authorization = f"Bearer {token}".encode() if token else b""
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _REQUEST_TIMEOUT_S
    server_version = "gpu-pool"
    sys_version = ""

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        try:
            status, ctype, body = self._route(path)
        except Exception:
            # A failing collector or health callback must cost one request, not the thread.
            log.exception("HTTP %s %s failed", self.command, path)
            status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        self.send_response(status)
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="gpu-pool metrics"')
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _route(self, path: str) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        if path == "/metrics":
            want = self.server.authorization
            given = self.headers.get("Authorization", "").encode("latin-1", "replace")
            if want and not hmac.compare_digest(given, want):  # constant time
                return 401, text, b"unauthorized: send Authorization: Bearer <token>\n"
            body, ctype = self.server.metrics.render_for(self.headers.get("Accept", ""))
            return 200, ctype, body
        if path in ("/healthz", "/readyz"):
            alive, ready, reason = self.server.health()
            if path == "/healthz":
                if alive:
                    return 200, text, b"ok\n"
                return 503, text, (reason or "not alive").encode() + b"\n"
            body = (reason or ("ready" if ready else "not ready")).encode() + b"\n"
            return (200 if ready else 503), text, body
        return 404, text, b"not found\n"

    def _method_not_allowed(self) -> None:
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)

    do_POST = do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def log_message(self, format: str, *args: object) -> None:
        # Probes hit this every few seconds; stderr would drown the journal.
        log.debug("%s - " + format, self.address_string(), *args)


class HttpEndpoint:
    """A running metrics/health server; :meth:`close` stops it and joins its thread."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self._closed = False

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (useful after asking for port 0)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def set_token(self, token: str) -> None:
        """Require ``token`` from the next request on ("" = none): one reference swap,
        which the HTTP thread reads per request (pool-ctl reload re-reads the file)."""
        self._server.authorization = f"Bearer {token}".encode() if token else b""

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()  # waits for serve_forever to return
        self._server.server_close()
        self._thread.join(timeout)

    def __enter__(self) -> HttpEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_token_file(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped); ValueError when
    the file cannot be read or holds none."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if not token:
        raise ValueError(f"{path} is empty")
    return token


def serve_http(
    address: str, metrics: PoolMetrics, health: HealthCheck, token: str = ""
) -> HttpEndpoint:
    """Bind ``address`` ("host:port", port 0 = any) and serve in a daemon thread.
    ``token``: what /metrics requires as a bearer token ("" = none).

    Binding happens here, in the caller's thread, so a taken port fails poold's startup
    with an ``OSError`` instead of failing silently in the background.
    """
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = _Server((host, port), family, metrics, health, token)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1},
        name="gpupool-http", daemon=True,
    )
    thread.start()
    log.info("metrics and health endpoint on %s:%d", host or "*", server.server_address[1])
    return HttpEndpoint(server, thread)
