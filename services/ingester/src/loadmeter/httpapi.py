"""HTTP on METRICS_HOST:METRICS_PORT: /metrics, /healthz and /readyz."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Check = Callable[[], list[str]]


class StatusServer:
    """Serves metrics and the two probes; each probe lists what is wrong."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        healthz: Check,
        readyz: Check,
    ) -> None:
        handler = _handler(registry, healthz, readyz)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self._serve, name="http", daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful when 0 asked for any free one)."""
        return int(self.server.server_address[1])

    def _serve(self) -> None:
        self.server.serve_forever(poll_interval=0.1)

    def start(self) -> None:
        """Serve in a background thread."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()


def _handler(
    registry: CollectorRegistry, healthz: Check, readyz: Check
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                problems = (healthz if path == "/healthz" else readyz)()
                body = ("\n".join(problems) if problems else "ok") + "\n"
                self._send(
                    503 if problems else 200, body.encode(), "text/plain; charset=utf-8"
                )
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Probes every few seconds are not worth a log line."""

    return Handler
