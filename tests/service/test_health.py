"""The HTTP endpoint against clients that connect and say nothing (real sockets, in process)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from dicom_node import health
from dicom_node.errors import NodeError
from dicom_node.health import HealthServer


def test_idle_clients_take_a_bounded_number_of_threads_and_are_dropped() -> None:
    """40 connections that send half a request line: at most MAX_CLIENTS threads serve them,
    the rest are closed at once, and each is dropped after CLIENT_SECONDS; then /healthz
    answers again and the threads are back to what they were."""
    server = HealthServer("127.0.0.1", 0, live=lambda: {"ok": True}, ready=lambda: {"ok": True})
    server.start()
    before = threading.active_count()
    idle = []
    try:
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"GET /heal")
            idle.append(s)
        time.sleep(0.5)
        assert threading.active_count() - before <= health.MAX_CLIENTS
        deadline = time.monotonic() + health.CLIENT_SECONDS + 10
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert threading.active_count() == before
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as rsp:
            assert rsp.status == 200
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_a_taken_http_port_names_the_settings() -> None:
    """An HTTP port already taken says which settings and address, not only errno 98."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(NodeError, match=rf"127\.0\.0\.1:{port} \(service\.http_host, service"):
            HealthServer("127.0.0.1", port, live=dict, ready=dict)
