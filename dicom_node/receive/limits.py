"""What one peer may cost the listener: connections, associations, time and PDU sizes.

pynetdicom 3.0.4's server leaves these open (measured here, see the platform notes):

* it does the TLS handshake in the accept loop, so one silent peer stalls every new TLS
  association;
* accepted sockets have no timeout, so a peer that sends half a PDU holds its thread forever;
* a PDU's length field is believed, whatever maximum we advertised;
* sockets that never send an A-ASSOCIATE-RQ count against ``maximum_associations``.

:class:`GuardedAssociationServer` closes them: the handshake runs in the connection's own
thread against a deadline; every socket has a timeout and every PDU must arrive whole within
``network_timeout_seconds``; a P-DATA PDU longer than ``max_pdu_bytes`` (or another PDU longer
than :data:`MAX_CONTROL_PDU_BYTES`) is answered with an A-ABORT before its body is read, and so
is the PDU that takes one message's data set past ``max_dataset_mb`` (pynetdicom gathers a
data set in memory whatever its length);
connections not yet associated are bounded on their own (:attr:`ConnectionLimits.max_pending`),
apart from associations. :class:`Admission` counts associations, in total and per calling AE,
for the receiver's A-ASSOCIATE-RJ (rejected-transient, local-limit-exceeded).

Each breach is reported through a callback ``report(code, message, **fields)``: the receiver
turns it into an audit record, a log line and the ``dicom_node_security_events`` counter.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, cast

from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.receive.tls import describe_failure, handshake

logger = logging.getLogger(__name__)

#: Longest PDU other than P-DATA-TF that is read. An A-ASSOCIATE-RQ proposing 128 presentation
#: contexts with 20 transfer syntaxes each is under 200 KiB; the rest are a few bytes.
MAX_CONTROL_PDU_BYTES = 1 << 20

_P_DATA_TF = 0x04
_PDU_TYPES = frozenset(range(0x01, 0x08))
#: A-ABORT, source: service provider (2), reason: invalid PDU parameter value (6).
_A_ABORT_INVALID_PARAMETER = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06))
_CHUNK = 256 * 1024
#: Slowest average a data set may arrive at once it has taken longer than the network timeout
#: (a link of 1 Mbit/s carries 128 KiB/s).
MIN_DATASET_BYTES_PER_SECOND = 8 * 1024
#: Longest command set of one message: a C-STORE-RQ's is a few hundred bytes (PS3.7 E.1), and
#: pynetdicom gathers one in memory whatever its length.
MAX_COMMAND_BYTES = 64 * 1024


class SecurityReporter(Protocol):
    """Where security events go: ``code`` is a metric label, ``message`` reads as a sentence."""

    def __call__(self, code: str, message: str, **fields: Any) -> None: ...


class PDUTooLongError(ConnectionError):
    """A peer announced a PDU longer than allowed; the connection was aborted.

    An :class:`OSError`, so that pynetdicom's DUL treats it as the end of the transport
    connection (an A-P-ABORT to the association).
    """


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Bounds on each connection of the listener.

    Attributes
    ----------
    max_pending
        Connections at once that have no association yet (TLS handshake, or waiting for the
        A-ASSOCIATE-RQ); one more is closed at once.
    handshake_seconds
        Deadline for the whole TLS handshake.
    pdu_seconds
        Each PDU must arrive whole within this; also the socket timeout for sends.
    max_pdata_bytes
        Longest P-DATA-TF PDU accepted (its length field, as advertised in the A-ASSOCIATE-AC).
    max_control_pdu_bytes
        Longest other PDU accepted.
    max_dataset_bytes
        Longest data set of one message, summed over its fragments.
    """

    max_pending: int
    handshake_seconds: float
    pdu_seconds: float
    max_pdata_bytes: int
    max_control_pdu_bytes: int = MAX_CONTROL_PDU_BYTES
    #: Longest data set of one DIMSE message (the sum of its fragments).
    max_dataset_bytes: int = 2 << 30


class GuardedAssociationSocket(AssociationSocket):
    """pynetdicom's socket wrapper that reads each PDU against a deadline and a length bound.

    pynetdicom's DUL reads a PDU as ``recv(6)`` (type, reserved, length) and then
    ``recv(length)`` when the type is known; this class checks the length between the two.
    """

    _limits: ConnectionLimits
    _report: SecurityReporter
    _peer: str
    #: The peer has closed the connection.
    peer_closed: bool
    _body: int | None
    _body_type: int
    _deadline: float
    _dataset_bytes: int
    _dataset_started: float
    _command_bytes: int
    #: Requests received whole whose response has not been sent yet.
    _outstanding: int
    #: When the PDU being read began, and how many of its bytes have come.
    _pdu_started: float
    _pdu_received: int

    @classmethod
    def guard(
        cls,
        sock: AssociationSocket,
        *,
        limits: ConnectionLimits,
        report: SecurityReporter,
        peer: str,
    ) -> None:
        """Turn the wrapper pynetdicom made for an accepted connection into a guarded one.

        The class of the existing object is swapped rather than a new wrapper made, because
        making an :class:`AssociationSocket` for a connection also signals the connection to
        the state machine (Evt5), which must happen once.
        """
        sock.__class__ = cls
        guarded = cast(GuardedAssociationSocket, sock)
        guarded._limits = limits
        guarded._report = report
        guarded._peer = peer
        guarded.peer_closed = False
        guarded._body = None
        guarded._body_type = 0
        guarded._deadline = 0.0
        guarded._dataset_bytes = 0
        guarded._dataset_started = 0.0
        guarded._command_bytes = 0
        guarded._outstanding = 0
        guarded._pdu_started = 0.0
        guarded._pdu_received = 0

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only if the peer closed), within the PDU's deadline.

        Raises
        ------
        TimeoutError
            The PDU did not arrive whole within ``pdu_seconds``.
        PDUTooLongError
            The header announces a PDU longer than allowed (an A-ABORT was sent).
        """
        if self._body is not None:  # the body of the PDU whose header was just read
            self._body = None
            body = self._read(nr_bytes)
            if self._body_type == _P_DATA_TF:
                self._count_dataset(body)
            return body
        self._pdu_started = time.monotonic()
        self._pdu_received = 0
        self._deadline = self._pdu_started + self._limits.pdu_seconds
        data = self._read(nr_bytes)
        if nr_bytes == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if pdu_type in _PDU_TYPES:
                limit = (
                    self._limits.max_pdata_bytes
                    if pdu_type == _P_DATA_TF
                    else self._limits.max_control_pdu_bytes
                )
                if length > limit:
                    self._refuse(pdu_type, length, limit)
                self._body = length
                self._body_type = pdu_type
        return data

    def _count_dataset(self, body: bytearray) -> None:
        """Add the fragments of a P-DATA-TF body to the message's running sizes; refuse the
        message once its data set passes ``max_dataset_bytes`` or its command set
        :data:`MAX_COMMAND_BYTES`, or once its data set has taken longer than ``pdu_seconds``
        at under :data:`MIN_DATASET_BYTES_PER_SECOND` (a peer that drips a few bytes a PDU
        would otherwise hold its association for good: each PDU is whole in time). A request
        that starts before the previous one was answered is refused too: the node negotiates
        no asynchronous operations (PS3.7 D.3.3.3), and pynetdicom would queue such requests
        in memory without bound while the spool files them one by one. Each PDV item: 4-byte
        length, context id, message control header (bit 0: command, bit 1: last fragment)."""
        pos = 0
        now = time.monotonic()
        while pos + 6 <= len(body):
            (item_length,) = struct.unpack_from(">L", body, pos)
            control = body[pos + 5]
            if control & 0x01:  # a command fragment
                if self._command_bytes == 0 and self._outstanding:
                    self._abort(
                        ConnectionError("a request before the response to the previous one"),
                        "request_before_response",
                        "a request sent before the previous one was answered (no asynchronous"
                        " operations were negotiated); association aborted",
                    )
                self._command_bytes += max(item_length - 2, 0)
                if self._command_bytes > MAX_COMMAND_BYTES:
                    self._abort(
                        PDUTooLongError(f"a command set of more than {MAX_COMMAND_BYTES} bytes"),
                        "command_too_long",
                        "command set longer than allowed; association aborted",
                        length=self._command_bytes,
                        limit=MAX_COMMAND_BYTES,
                    )
                if control & 0x02:  # the whole command: a request to answer
                    self._command_bytes = 0
                    self._outstanding += 1
            else:  # a data-set fragment
                if self._dataset_bytes == 0:
                    self._dataset_started = now
                self._dataset_bytes += max(item_length - 2, 0)
                limit = self._limits.max_dataset_bytes
                if self._dataset_bytes > limit:
                    self._abort(
                        PDUTooLongError(f"a data set of more than {limit} bytes"),
                        "dataset_too_long",
                        "data set longer than allowed; association aborted",
                        length=self._dataset_bytes,
                        limit=limit,
                    )
                if control & 0x02:  # its last fragment: the next message starts afresh
                    self._dataset_bytes = 0
            pos += 4 + item_length
        taken = now - self._dataset_started
        if (
            self._dataset_bytes
            and taken > self._limits.pdu_seconds
            and self._dataset_bytes < MIN_DATASET_BYTES_PER_SECOND * taken
        ):
            self._abort(
                ConnectionError(f"a data set at under {MIN_DATASET_BYTES_PER_SECOND} bytes/s"),
                "peer_too_slow",
                "data set arriving too slowly; association aborted",
                length=self._dataset_bytes,
                seconds=round(taken, 1),
            )

    def send(self, bytestream: bytes) -> None:
        """Send a PDU; a P-DATA-TF carrying the last fragment of a command set is a response,
        and the request it answers is no longer outstanding."""
        if bytestream[:1] == bytes((_P_DATA_TF,)):
            pos = 6
            while pos + 6 <= len(bytestream):
                (item_length,) = struct.unpack_from(">L", bytestream, pos)
                if bytestream[pos + 5] & 0x03 == 0x03 and self._outstanding:
                    self._outstanding -= 1
                pos += 4 + item_length
        super().send(bytestream)

    def _read(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is None:
            raise ConnectionError("socket closed")
        buf = bytearray(nr_bytes)
        got = 0
        try:
            with memoryview(buf) as view:
                while got < nr_bytes:
                    # past the deadline the smallest timeout makes recv_into raise TimeoutError
                    sock.settimeout(max(self._deadline - time.monotonic(), 1e-6))
                    n = sock.recv_into(view[got:], min(nr_bytes - got, _CHUNK))
                    if n == 0:
                        self._closed_by_peer()
                        break  # peer closed; the DUL sees a short PDU
                    got += n
                    self._progress(n)
        except TimeoutError:
            self._report(
                "peer_stalled",
                "peer stalled in the middle of a PDU; connection closed",
                peer=self._peer,
                calling_ae=self._calling_ae(),
                seconds=self._limits.pdu_seconds,
            )
            raise
        finally:
            if self.socket is not None:
                self.socket.settimeout(self._limits.pdu_seconds)
        del buf[got:]
        return buf

    def _progress(self, received: int) -> None:
        """``received`` bytes arrived. The PDU's deadline moves on by the time they take at
        the slowest rate allowed (:data:`MIN_DATASET_BYTES_PER_SECOND`): a slow but steady
        link is served, while a peer that sends a PDU's header and then little or nothing is
        still cut off after ``pdu_seconds``. And the association is not idle: pynetdicom
        restarts its idle timer (``network_timeout``) only once a whole PDU is read, and its
        association thread would abort a link that takes longer than that over one PDU."""
        self._pdu_received += received
        self._deadline = max(
            self._deadline,
            self._pdu_started
            + self._limits.pdu_seconds
            + self._pdu_received / MIN_DATASET_BYTES_PER_SECOND,
        )
        timer = getattr(self.assoc.dul, "_idle_timer", None)
        if timer is not None:
            timer.restart()

    def _closed_by_peer(self) -> None:
        """The peer closed the connection. Before its A-ASSOCIATE-RQ, pynetdicom's association
        thread would wait out the ACSE timeout for a request that cannot come, counting against
        ``maximum_associations`` all the while: it is woken as by that timeout (an empty
        primitive), and ends."""
        self.peer_closed = True
        if self.assoc.requestor.primitive is None:
            self.assoc.dul.to_user_queue.put(None)

    def _calling_ae(self) -> str | None:
        primitive = self.assoc.requestor.primitive
        return None if primitive is None else str(primitive.calling_ae_title).strip()

    def _refuse(self, pdu_type: int, length: int, limit: int) -> None:
        self._abort(
            PDUTooLongError(f"PDU of type 0x{pdu_type:02X} announces {length} bytes (> {limit})"),
            "pdu_too_long",
            "PDU longer than allowed; association aborted",
            pdu_type=pdu_type,
            length=length,
            limit=limit,
        )

    def _abort(self, error: ConnectionError, code: str, message: str, **fields: Any) -> NoReturn:
        """Report a breach (``code``, ``message``, ``fields``), send an A-ABORT and raise
        ``error``, which pynetdicom's DUL takes for the end of the connection."""
        self._report(code, message, peer=self._peer, calling_ae=self._calling_ae(), **fields)
        sock = self.socket
        if sock is not None:
            try:
                sock.settimeout(1.0)
                sock.sendall(_A_ABORT_INVALID_PARAMETER)
            except OSError:
                pass  # the connection is being dropped anyway
        raise error


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, with the association's socket guarded."""

    server: GuardedAssociationServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        GuardedAssociationSocket.guard(
            cast(AssociationSocket, assoc.dul.socket),
            limits=self.server.limits,
            report=self.server.report,
            peer=str(self.client_address[0]),
        )
        self.server.handed_over(assoc)
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """An association server that bounds what each connection may cost (module docstring).

    Built by ``AE.make_server(..., server_class=GuardedAssociationServer, limits=...,
    report=...)``. With an ``ssl_context`` every connection must complete a TLS handshake
    within ``limits.handshake_seconds``, in its own thread.
    """

    daemon_threads = True

    def __init__(  # noqa: PLR0917 - AE.make_server passes these positionally
        self,
        ae: Any,
        address: tuple[str, int] | tuple[str, int, int, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: Any = None,
        evt_handlers: list[EventHandlerType] | None = None,
        *,
        limits: ConnectionLimits,
        report: SecurityReporter,
    ) -> None:
        self.limits = limits
        self.report = report
        self._lock = threading.Lock()
        # every connection without an association yet, exactly once: token -> its association
        # once made (None before: in the TLS handshake, or its thread not yet running)
        self._pending: dict[int, Association | None] = {}
        self._addresses: dict[int, str] = {}  # token -> the peer's address
        self._tokens: dict[int, int] = {}  # id(accepted socket) -> token, until its thread runs
        self._next_token = itertools.count()
        self._local = threading.local()
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers,
            request_handler=GuardedRequestHandler,
        )

    def pending_connections(self, address: str | None = None) -> int:
        """Connections without an association yet (from ``address`` only, when given): in the
        TLS handshake, or waiting for their A-ASSOCIATE-RQ. One whose peer has closed it counts
        no more, though pynetdicom keeps its thread until the ACSE timeout."""
        with self._lock:
            for token, assoc in list(self._pending.items()):
                if assoc is None:
                    continue
                requested = assoc.requestor.primitive is not None
                ended = assoc.ident is not None and not assoc.is_alive()
                closed = getattr(assoc.dul.socket, "peer_closed", False)
                if requested or ended or closed:
                    del self._pending[token]
                    self._addresses.pop(token, None)
            if address is None:
                return len(self._pending)
            return sum(1 for t in self._pending if self._addresses.get(t) == address)

    def handed_over(self, assoc: Association) -> None:
        """The connection of this thread now has ``assoc`` (called by the request handler)."""
        token = getattr(self._local, "token", None)
        if token is not None:
            with self._lock:
                self._pending[token] = assoc

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; nothing else happens here (no TLS: that waits on the peer)."""
        assert self.socket is not None
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse (close) a connection when ``max_pending`` others have no association yet, or
        half of them come from its address (one host cannot take every slot)."""
        address = str(client_address[0])
        pending = self.pending_connections()
        mine = self.pending_connections(address)
        per_address = max(1, self.limits.max_pending // 2)
        if pending >= self.limits.max_pending or mine >= per_address:
            self.report(
                "connection_limit",
                "too many connections without an association; connection closed",
                peer=address,
                pending=pending,
                from_peer=mine,
            )
            return False
        with self._lock:
            token = next(self._next_token)
            self._pending[token] = None
            self._addresses[token] = address
            self._tokens[id(request)] = token
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread (its count is undone if the thread cannot start)."""
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(self._token_of(request), keep_handed_over=False)
            raise

    def _token_of(self, request: Any) -> int | None:
        with self._lock:
            return self._tokens.pop(id(request), None)

    def _forget(self, token: int | None, *, keep_handed_over: bool) -> None:
        with self._lock:
            if token is not None and not (keep_handed_over and self._pending.get(token)):
                self._pending.pop(token, None)
                self._addresses.pop(token, None)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: TLS handshake (if any) by its deadline, then the
        association. A failed handshake is reported and the connection closed."""
        sock: socket.socket = request
        token = self._token_of(request)
        self._local.token = token
        try:
            try:
                if self.ssl_context is not None:
                    sock = self.ssl_context.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
                    handshake(sock, timeout=self.limits.handshake_seconds)
            except OSError as exc:  # ssl.SSLError, TimeoutError, a reset connection
                self.report(
                    "tls_handshake_failed",
                    "TLS handshake failed; connection closed",
                    peer=str(client_address[0]),
                    detail=describe_failure(exc),
                )
                self.shutdown_request(sock)
                return
            sock.settimeout(self.limits.pdu_seconds)
            try:
                self.finish_request(sock, client_address)
            except Exception:  # noqa: BLE001 - one connection must not end the thread; logged
                self.handle_error(sock, client_address)
                self.shutdown_request(sock)
        finally:
            self._local.token = None
            # an association made of this connection counts on until its request arrives
            self._forget(token, keep_handed_over=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log an unexpected error of one connection (socketserver would print it)."""
        logger.exception("connection failed", extra={"fields": {"peer": str(client_address[0])}})


class Admission:
    """Associations past their A-ASSOCIATE-RQ, counted in total and per calling AE title.

    :meth:`admit` is called from ``EVT_REQUESTED``, :meth:`leave` when an association ends;
    an association whose thread has ended is forgotten in any case.
    """

    def __init__(self, *, total: int, per_caller: int | None) -> None:
        self.total = total
        self.per_caller = per_caller
        self._held: dict[Association, str] = {}
        self._lock = threading.Lock()

    def admit(self, assoc: Association, calling_ae: str) -> str | None:
        """Count ``assoc`` in, or return why not: ``association_limit`` or ``caller_limit``."""
        with self._lock:
            for held in [a for a in self._held if not a.is_alive()]:
                del self._held[held]
            if len(self._held) >= self.total:
                return "association_limit"
            if self.per_caller is not None:
                mine = sum(1 for c in self._held.values() if c == calling_ae)
                if mine >= self.per_caller:
                    return "caller_limit"
            self._held[assoc] = calling_ae
            return None

    def leave(self, assoc: Association) -> None:
        """Count ``assoc`` out (released, aborted or rejected)."""
        with self._lock:
            self._held.pop(assoc, None)

    def held(self) -> int:
        """Associations counted in now."""
        with self._lock:
            return len(self._held)


class EventGate:
    """Lets at most ``burst`` reports per (code, peer) through in each ``window`` seconds.

    A peer hammering the port must not fill the disk with audit records; the counter in the
    metrics still counts every event, and the next record let through says how many were held.
    """

    def __init__(self, *, burst: int = 20, window: float = 60.0) -> None:
        self.burst = burst
        self.window = window
        self._seen: dict[tuple[str, str], tuple[float, int, int]] = {}
        self._lock = threading.Lock()

    def allow(self, code: str, peer: str) -> int | None:
        """``None`` to hold this report back; else how many were held back before it."""
        now = time.monotonic()
        key = (code, peer)
        with self._lock:
            if len(self._seen) > 4096:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window}
            start, count, held = self._seen.get(key, (now, 0, 0))
            if now - start >= self.window:
                start, count = now, 0
            if count >= self.burst:
                self._seen[key] = (start, count, held + 1)
                return None
            self._seen[key] = (start, count + 1, 0)
            return held
