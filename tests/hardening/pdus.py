"""Hand-built DICOM Upper Layer PDUs (PS3.8 section 9.3) and a scripted raw peer.

Everything here is built byte by byte with :mod:`struct`, so a test can send exactly the frame it
means, malformed ones included: a wrong length, an unknown type, a context the node never
accepted, half a PDU and then silence. :class:`RawPeer` speaks them over a plain (or TLS) socket.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1.1"

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

COMMAND = 0x01  # message control header bit 0: command (else data set)
LAST = 0x02  # bit 1: last fragment


# -- frames ---------------------------------------------------------------------------------


def pdu(pdu_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """A PDU: type, reserved, 4-byte big-endian length (``length`` overrides the true one)."""
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16, b" ")[:16]


@dataclass(frozen=True)
class Context:
    """A proposed presentation context: odd id, abstract syntax, transfer syntaxes."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: Sequence[str] = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)


def associate_rq(
    contexts: Sequence[Context],
    *,
    called: str = "DICOM_NODE",
    calling: str = "RAWPEER",
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts``, advertising ``max_pdu`` as our limit."""
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for cx in contexts:
        sub = _item(0x30, cx.abstract_syntax.encode())
        for ts in cx.transfer_syntaxes:
            sub += _item(0x40, ts.encode())
        items += _item(0x20, struct.pack(">BBBB", cx.context_id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_UID.encode())
    items += _item(0x50, user)
    fixed = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
    return pdu(A_ASSOCIATE_RQ, fixed + items)


def p_data(pdvs: Sequence[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF PDU of ``(context id, message control header, fragment)`` values."""
    body = b"".join(struct.pack(">LBB", len(data) + 2, cx, mch) + data for cx, mch, data in pdvs)
    return pdu(P_DATA_TF, body)


def release_rq() -> bytes:
    """An A-RELEASE-RQ."""
    return pdu(A_RELEASE_RQ, bytes(4))


def abort(*, source: int = 0, reason: int = 0) -> bytes:
    """An A-ABORT (source 0: service user)."""
    return pdu(A_ABORT, struct.pack(">BBBB", 0, 0, source, reason))


# -- DIMSE command sets (implicit VR little endian, PS3.7 section 9.3) ------------------------


def _element(group: int, elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHL", group, elem, len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def command_set(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """A command set: (element number in group 0000, value) pairs, with its group length."""
    body = b"".join(_element(0x0000, e, v) for e, v in sorted(elements))
    return _element(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def c_echo_rq(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set."""
    return command_set(
        [(0x0002, VERIFICATION.encode()), (0x0100, _us(0x0030)), (0x0110, _us(message_id)),
         (0x0800, _us(0x0101))]
    )  # fmt: skip


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set announcing a data set."""
    return command_set(
        [(0x0002, sop_class.encode()), (0x0100, _us(0x0001)), (0x0110, _us(message_id)),
         (0x0700, _us(0)), (0x0800, _us(0x0000)), (0x1000, sop_instance.encode())]
    )  # fmt: skip


def command_elements(data: bytes) -> dict[int, bytes]:
    """Element number → value of a command set (group 0000, implicit VR little endian)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        _group, elem, length = struct.unpack_from("<HHL", data, pos)
        out[elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


def fragments(
    context_id: int, data: bytes, *, command: bool, max_pdu: int = 16384
) -> Iterator[bytes]:
    """``data`` as P-DATA-TF PDUs of one PDV each, no PDU longer than ``max_pdu``."""
    step = max_pdu - 6  # the PDV's length field, context id and control header
    chunks = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
    for i, chunk in enumerate(chunks):
        mch = (COMMAND if command else 0) | (LAST if i == len(chunks) - 1 else 0)
        yield p_data([(context_id, mch, chunk)])


def dataset_of(path: Path) -> tuple[bytes, str, str, str]:
    """The data set bytes of a DICOM file (after its meta header), its transfer syntax,
    SOP Class and SOP Instance UID."""
    from pydicom.filereader import read_file_meta_info

    meta = read_file_meta_info(path)
    raw = path.read_bytes()
    start = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    return (
        raw[start:],
        str(meta.TransferSyntaxUID),
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
    )


# -- the raw peer ---------------------------------------------------------------------------


class PeerClosed(ConnectionError):
    """The node closed the connection."""


@dataclass
class Received:
    """A PDU the node sent: type and body."""

    pdu_type: int
    body: bytes

    def reject_reason(self) -> tuple[int, int, int]:
        """(result, source, reason) of an A-ASSOCIATE-RJ."""
        assert self.pdu_type == A_ASSOCIATE_RJ, self
        return self.body[1], self.body[2], self.body[3]

    def accepted(self) -> dict[int, tuple[int, str]]:
        """Context id → (result, transfer syntax) of an A-ASSOCIATE-AC."""
        assert self.pdu_type == A_ASSOCIATE_AC, self
        out: dict[int, tuple[int, str]] = {}
        pos = 68
        while pos + 4 <= len(self.body):
            item_type, _, length = struct.unpack_from(">BBH", self.body, pos)
            value = self.body[pos + 4 : pos + 4 + length]
            if item_type == 0x21:
                ts = value[8:].rstrip(b"\0").decode() if len(value) > 8 else ""
                out[value[0]] = (value[2], ts)
            pos += 4 + length
        return out


@dataclass
class RawPeer:
    """A scripted association requestor over one socket (plain, or TLS with ``wrap``)."""

    port: int
    timeout: float = 5.0
    tls: ssl.SSLContext | None = None
    sock: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            self.sock = self.tls.wrap_socket(self.sock, server_hostname="localhost")

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise PeerClosed(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def receive(self) -> Received:
        """The next PDU from the node (:class:`PeerClosed` when the connection ends)."""
        try:
            header = self._exact(6)
        except ConnectionResetError as exc:
            raise PeerClosed("connection reset") from exc
        pdu_type, _, length = struct.unpack(">BBL", header)
        return Received(pdu_type, self._exact(length))

    def associate(
        self, contexts: Sequence[Context] = (Context(1, VERIFICATION),), **kwargs: object
    ) -> Received:
        """Send an A-ASSOCIATE-RQ and return the answer (AC or RJ)."""
        self.send(associate_rq(contexts, **kwargs))  # type: ignore[arg-type]
        return self.receive()

    def response(self) -> dict[int, bytes]:
        """Read P-DATA until a whole command set has come; return its elements."""
        data = b""
        while True:
            got = self.receive()
            if got.pdu_type != P_DATA_TF:
                raise PeerClosed(f"expected P-DATA, got PDU type 0x{got.pdu_type:02X}")
            pos = 0
            while pos < len(got.body):
                (length,) = struct.unpack_from(">L", got.body, pos)
                mch = got.body[pos + 5]
                data += got.body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if mch & COMMAND and mch & LAST:
                    return command_elements(data)

    def echo(self, context_id: int = 1) -> int:
        """C-ECHO on ``context_id``; returns the status."""
        self.send(p_data([(context_id, COMMAND | LAST, c_echo_rq())]))
        return int(struct.unpack("<H", self.response()[0x0900])[0])

    def store(
        self,
        context_id: int,
        dataset: bytes,
        *,
        sop_class: str,
        sop_instance: str,
        max_pdu: int = 16384,
    ) -> int:
        """C-STORE ``dataset``; returns the status."""
        for frame in fragments(
            context_id, c_store_rq(sop_class, sop_instance), command=True, max_pdu=max_pdu
        ):
            self.send(frame)
        for frame in fragments(context_id, dataset, command=False, max_pdu=max_pdu):
            self.send(frame)
        return int(struct.unpack("<H", self.response()[0x0900])[0])

    def release(self) -> None:
        """A-RELEASE-RQ and wait for the A-RELEASE-RP."""
        self.send(release_rq())
        got = self.receive()
        assert got.pdu_type == A_RELEASE_RP, got

    def wait_closed(self, timeout: float) -> tuple[float, list[int]]:
        """Read until the node closes the connection: (seconds it took, PDU types seen).

        Raises ``TimeoutError`` if it is still open after ``timeout`` seconds.
        """
        started = time.monotonic()
        seen: list[int] = []
        deadline = started + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"connection still open after {timeout} s (saw {seen})")
            self.sock.settimeout(left)
            try:
                header = self.sock.recv(6)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return time.monotonic() - started, seen
            if not header:
                return time.monotonic() - started, seen
            seen.append(header[0])
            if len(header) == 6:
                (length,) = struct.unpack(">L", header[2:6])
                try:
                    self._drain(length)
                except (PeerClosed, ConnectionResetError):
                    return time.monotonic() - started, seen

    def _drain(self, n: int) -> None:
        while n > 0:
            chunk = self.sock.recv(min(n, 65536))
            if not chunk:
                raise PeerClosed("closed")
            n -= len(chunk)
