"""A small HTTP proxy for fault-injection tests.

``FaultProxy(target)`` listens on a free loopback port and forwards every
request to ``target`` (``http://host:port``) unchanged: method, path, headers
and body (gzip included), answering with the upstream's status, headers and
body. A script of faults takes over the next requests, in order:

- ``fail_next(n, status=..., headers=..., body=...)``: answer the next ``n``
  requests itself, without forwarding them.
- ``delay_next(n, seconds)``: hold the next ``n`` requests, then forward them.
- ``drop_next(n)``: close the connection without any answer.

Standing rules apply to every later request that no scripted fault takes:

- ``refuse(status=..., containing=b"...")``: answer ``status`` to each
  request whose (decompressed) body contains the marker, or to every request
  when no marker is given, as an InfluxDB refusing some points would;
  ``stop_refusing()`` lifts the rules.

When the upstream cannot be reached the proxy answers 502, as a reverse
proxy would.

Every request is recorded in ``requests`` as it arrives, before any fault
applies, so a test can count attempts exactly::

    with FaultProxy(victoria.url) as proxy:
        proxy.fail_next(1, status=429, headers={"Retry-After": "2"})
        ...
        assert len(proxy.requests) == 1
"""

from __future__ import annotations

import gzip
import http.client
import http.server
import json
import sys
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType

# Headers that describe one connection, not the message: never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)
UPSTREAM_TIMEOUT = 30.0
# How soon stop() takes effect; http.server's default is half a second.
POLL_INTERVAL = 0.05


@dataclass(frozen=True)
class SeenRequest:
    """One request as the proxy received it; ``body`` is the raw bytes.

    ``at`` is when it had fully arrived, on the ``time.monotonic`` clock.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        """The header ``name``, compared case-insensitively."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)

    def payload(self) -> bytes:
        """The body with any gzip ``Content-Encoding`` undone."""
        if (self.header("Content-Encoding") or "").lower() == "gzip":
            return gzip.decompress(self.body)
        return self.body


@dataclass(frozen=True)
class Fault:
    """What to do with one request instead of plainly forwarding it."""

    delay: float = 0.0
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    drop: bool = False


@dataclass(frozen=True)
class Rule:
    """A standing answer for every request whose body contains ``marker``."""

    marker: bytes
    fault: Fault

    def matches(self, seen: SeenRequest) -> bool:
        """Whether ``seen`` carries the marker (any request for an empty one)."""
        return self.marker in seen.payload()


def influx_error_body(code: str, message: str) -> bytes:
    """An error body shaped as InfluxDB 2.x writes it."""
    return json.dumps({"code": code, "message": message}).encode()


class FaultProxy:
    """A threaded HTTP proxy in front of ``target`` with scripted faults."""

    def __init__(self, target: str) -> None:
        parts = urllib.parse.urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"target must be http://host:port, got {target!r}")
        self.target_host = parts.hostname
        self.target_port = parts.port or 80
        self.requests: list[SeenRequest] = []
        self._script: deque[Fault] = deque()
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL},
            name="faultproxy",
            daemon=True,
        )

    @property
    def url(self) -> str:
        """Where clients should send their requests."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cutting short any delay in progress."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def fail_next(
        self,
        n: int = 1,
        *,
        status: int = 503,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        delay: float = 0.0,
    ) -> None:
        """Answer the next ``n`` requests with ``status`` instead of forwarding."""
        self._add(
            n, Fault(delay=delay, status=status, headers=headers or {}, body=body)
        )

    def delay_next(self, n: int = 1, *, seconds: float) -> None:
        """Hold the next ``n`` requests for ``seconds``, then forward them."""
        self._add(n, Fault(delay=seconds))

    def drop_next(self, n: int = 1) -> None:
        """Close the connection of the next ``n`` requests without answering."""
        self._add(n, Fault(drop=True))

    def refuse(
        self,
        *,
        status: int,
        containing: bytes = b"",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> None:
        """Answer ``status`` to every later request whose body has ``containing``.

        The body is compared after any gzip is undone; an empty marker matches
        every request. Scripted faults still take their requests first.
        """
        fault = Fault(status=status, headers=headers or {}, body=body)
        with self._lock:
            self._rules.append(Rule(containing, fault))

    def stop_refusing(self) -> None:
        """Drop every rule ``refuse`` set: requests are forwarded again."""
        with self._lock:
            self._rules.clear()

    def _add(self, n: int, fault: Fault) -> None:
        with self._lock:
            self._script.extend([fault] * n)

    def _record(self, seen: SeenRequest) -> Fault | None:
        with self._lock:
            self.requests.append(seen)
            if self._script:
                return self._script.popleft()
            return next((r.fault for r in self._rules if r.matches(seen)), None)

    def _forward(self, seen: SeenRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection(
            self.target_host, self.target_port, timeout=UPSTREAM_TIMEOUT
        )
        try:
            headers = {
                k: v for k, v in seen.headers.items() if k.lower() not in HOP_BY_HOP
            }
            upstream.request(seen.method, seen.path, body=seen.body, headers=headers)
            response = upstream.getresponse()
            body = response.read()
            return response.status, response.getheaders(), body
        finally:
            upstream.close()


class _Server(http.server.ThreadingHTTPServer):
    def __init__(
        self,
        address: tuple[str, int],
        handler: type[http.server.BaseHTTPRequestHandler],
        proxy: FaultProxy,
    ) -> None:
        super().__init__(address, handler)
        self.proxy = proxy

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that timed out hangs up before its answer: expected here.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _handle(self) -> None:
        proxy = self.server.proxy
        seen = SeenRequest(self.command, self.path, dict(self.headers), self._body())
        fault = proxy._record(seen)

        if fault is not None and fault.delay and proxy._stopping.wait(fault.delay):
            self.close_connection = True
            return
        if fault is not None and fault.drop:
            self.close_connection = True
            return
        if fault is not None and fault.status is not None:
            self._answer(fault.status, list(fault.headers.items()), fault.body)
            return
        try:
            answer = proxy._forward(seen)
        except OSError as exc:
            # Like a real reverse proxy whose upstream is down.
            answer = (502, [], f"upstream unreachable: {exc}".encode())
        self._answer(*answer)

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _chunked_body(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    continue
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return

    # http.server dispatches on these names; every method is proxied alike.
    do_GET = do_POST = do_PUT = _handle  # noqa: N815
    do_DELETE = do_HEAD = do_PATCH = _handle  # noqa: N815
