"""The HTTP endpoint on loopback: Prometheus ``/metrics``, ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process's threads are alive (liveness). ``/readyz`` answers
200 only when the port is bound, the model is loaded, the disk is above the floor and the job
store is writable; otherwise 503 with the failed checks as JSON.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_node.errors import NodeError
from dicom_node.metrics import REGISTRY

logger = logging.getLogger(__name__)

Checks = Callable[[], dict[str, bool]]

#: A client has this long to send its request and take the answer.
CLIENT_SECONDS = 5.0
#: Requests served at once; more are closed at once (the endpoint is for probes and scrapes).
MAX_CLIENTS = 16


class _BoundedServer(ThreadingHTTPServer):
    """A thread per request, at most :data:`MAX_CLIENTS` of them: slow or idle clients cannot
    take the node's threads (the unit's TasksMax) one by one."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HealthServer:
    """Serves the endpoint from a daemon thread.

    Parameters
    ----------
    host, port
        Where to listen (port 0: any free port; see :attr:`port`).
    live, ready
        Functions returning named checks; all true means healthy / ready.
    """

    def __init__(self, host: str, port: int, *, live: Checks, ready: Checks) -> None:
        checks = {"/healthz": live, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            timeout = CLIENT_SECONDS  # on the socket: a client that stalls is dropped

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = generate_latest(REGISTRY)
                    self._reply(200, body, CONTENT_TYPE_LATEST)
                elif path in checks:
                    results = checks[path]()
                    ok = all(results.values())
                    body = json.dumps({"ok": ok, "checks": results}).encode()
                    self._reply(200 if ok else 503, body, "application/json")
                else:
                    self._reply(404, b"not found\n", "text/plain")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                logger.debug("http: " + format, *args)

        try:
            self._server = _BoundedServer((host, port), Handler)
        except OSError as exc:
            raise NodeError(
                f"cannot listen for HTTP on {host}:{port} (service.http_host, service.http_port):"
                f" {exc.strerror}"
            ) from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
