"""Free loopback ports for the test peers: never the same one twice in a process."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from dicom_node.testing import orthanc


class _KernelRepeating:
    """Stands in for ``socket.socket``: the kernel handing out a port it has just released again
    (seen: a node configured with its DICOM and HTTP ports equal), which cannot be provoked."""

    offers: ClassVar[list[int]] = [47001, 47001, 47001, 47002]

    def __init__(self, *_args: Any) -> None:
        self.port = 0

    def __enter__(self) -> _KernelRepeating:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def bind(self, _address: tuple[str, int]) -> None:
        self.port = self.offers.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_free_port_never_hands_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orthanc, "_HANDED_OUT", set())
    monkeypatch.setattr(orthanc.socket, "socket", _KernelRepeating)
    assert [orthanc.free_port(), orthanc.free_port()] == [47001, 47002]


def test_free_ports_are_distinct_and_bindable() -> None:
    import socket

    ports = [orthanc.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
