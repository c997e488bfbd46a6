"""The C-STORE and C-ECHO SCU: one association per batch, proposing exactly what it sends."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from dicom_node.config import DestinationTLS, DispatchSettings
from dicom_node.errors import ConfigError
from dicom_node.receive.tls import client_context

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True, slots=True)
class Peer:
    """Where to send: a DICOM application entity."""

    name: str
    ae_title: str
    host: str
    port: int
    #: DICOM TLS to this peer (``None``: plain TCP).
    tls: DestinationTLS | None = None
    #: Where ``tls`` stands in the configuration, for its errors (default: a destination's).
    tls_key: str = ""


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What happened to one file: ``delivered`` for success and warning statuses."""

    path: Path
    delivered: bool
    status: int | None
    detail: str


#: How long an aborted association waits for the peer to close the connection (pynetdicom's
#: ARTIM timer) before its socket is shut down.
ABORT_SECONDS = 2.0


class OpenAssociations:
    """The associations a sender has open, so that the node's stop can abort them (A-ABORT).

    pynetdicom's DUL thread is not a daemon thread: an association waiting on a slow PACS
    (``dispatch.dimse_timeout_seconds``) would otherwise hold the process well past its stop.
    Once :meth:`abort_all` ran, no association is opened any more (one being opened is aborted
    as soon as its connection is made).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Association] = set()
        self._aborted = threading.Event()

    @property
    def aborted(self) -> bool:
        """Whether :meth:`abort_all` ran."""
        return self._aborted.is_set()

    def add(self, assoc: Association) -> None:
        """Track ``assoc`` (its connection is open); aborted at once after :meth:`abort_all`."""
        with self._lock:
            self._open.add(assoc)
            if not self._aborted.is_set():
                return
        _abort(assoc)

    def discard(self, assoc: Association) -> None:
        """Stop tracking ``assoc`` (released, aborted, or never connected)."""
        with self._lock:
            self._open.discard(assoc)

    def abort_all(self, timeout: float = ABORT_SECONDS) -> int:
        """Abort every open association and refuse new ones; returns how many were open.

        Waits up to ``timeout`` for the peer to close each connection, then shuts the
        socket down (a PACS that does not read, or sleeps in its handler, never answers the
        A-ABORT), so that no DUL thread outlives this by more than a moment. A thread waiting
        for a response on an aborted association is woken (it gets no response).
        """
        with self._lock:
            self._aborted.set()
            assocs = list(self._open)
        for assoc in assocs:
            _abort(assoc, artim_seconds=timeout)
        deadline = time.monotonic() + timeout + 0.5
        for assoc in assocs:
            assoc.dul.join(max(0.0, deadline - time.monotonic()))
        for assoc in assocs:
            if assoc.dul.is_alive():
                _shut_down(assoc)
                assoc.dul.join(1.0)
            assoc.dimse.msg_queue.put((None, None))  # wakes a send_c_store waiting for its rsp
        return len(assocs)


def _abort(assoc: Association, *, artim_seconds: float = ABORT_SECONDS) -> None:
    """Send an A-ABORT without waiting: the DUL thread ends once the peer closes the
    connection or ``artim_seconds`` have passed."""
    with contextlib.suppress(Exception):  # an association ending meanwhile
        assoc.acse_timeout = artim_seconds  # also pynetdicom's ARTIM timer after the A-ABORT
        assoc.abort(block=False)


def _shut_down(assoc: Association) -> None:
    """Shut the association's socket down: a blocked read or write in its DUL thread ends."""
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            # the plain socket's shutdown, also for TLS (SSLSocket's would drop its SSL object
            # under a DUL thread still using it)
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _ae(calling_ae: str, settings: DispatchSettings) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = settings.acse_timeout_seconds
    ae.dimse_timeout = settings.dimse_timeout_seconds
    ae.network_timeout = settings.network_timeout_seconds
    ae.connection_timeout = settings.connect_timeout_seconds
    return ae


def _tls_args(peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``peer``: a fresh context (certificates re-read from disk,
    so renewed ones take effect) and the host name its certificate must carry."""
    if peer.tls is None:
        return None
    where = peer.tls_key or f"destinations[{peer.name}].tls"
    return client_context(peer.tls, where=where), peer.host


def _recording_handshakes(context: ssl.SSLContext) -> list[ssl.SSLError]:
    """Make ``context``'s sockets keep the error of a failed handshake, which pynetdicom
    swallows (a certificate the destination should not have looks like a network outage)."""
    failures: list[ssl.SSLError] = []

    class Recording(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            try:
                super().do_handshake(block)
            except ssl.SSLError as exc:
                failures.append(exc)
                raise

    context.sslsocket_class = Recording
    return failures


def _associate(
    ae: AE,
    peer: Peer,
    tls_args: tuple[ssl.SSLContext, str] | None,
    associations: OpenAssociations | None = None,
) -> tuple[Association, str | None]:
    """Associate with ``peer``; and, when no connection was made, why (pynetdicom marks an
    association aborted whether the peer aborted it or no connection was ever made). With
    ``associations``, the association is tracked there from its connection on."""
    opened: list[bool] = []
    failures = _recording_handshakes(tls_args[0]) if tls_args is not None else []

    def on_open(event: evt.Event) -> None:
        opened.append(True)
        if associations is not None:
            associations.add(event.assoc)

    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
    )
    if opened:
        return assoc, None
    where = f"{peer.host}:{peer.port}"
    if failures:
        exc = failures[-1]
        reason = getattr(exc, "verify_message", None) or exc.reason or str(exc)
        return assoc, f"TLS handshake with {where} failed: {reason}"
    return assoc, f"no connection to {where} (refused, unreachable or timed out)"


def _syntaxes_for(syntax: str) -> list[str]:
    """The transfer syntaxes to propose for a file in ``syntax``: an uncompressed one may go in
    any uncompressed syntax (pynetdicom re-encodes it), so Implicit VR Little Endian, the
    default every SCP must accept, is proposed too, after the file's own."""
    if UID(syntax).is_compressed or UID(syntax).is_deflated:
        return [syntax]
    return list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))


def _why_not_established(assoc: object, no_connection: str | None) -> str:
    if no_connection is not None:
        return no_connection
    if getattr(assoc, "is_rejected", False):
        return "association rejected"
    refused = getattr(assoc, "rejected_contexts", None)
    if refused and not getattr(assoc, "accepted_contexts", None):  # pynetdicom then aborts
        proposed = sorted(
            {
                f"{getattr(c, 'abstract_syntax', '?')} in"
                f" {'/'.join(str(s) for s in getattr(c, 'transfer_syntax', ()))}"
                for c in refused
            }
        )
        return (
            "not accepted by the peer (SOP class or transfer syntax): no presentation context"
            f" for {', '.join(proposed)}"
        )
    if getattr(assoc, "is_aborted", False):
        return "association aborted"
    return "no association (the peer did not answer the request in time)"


def send_files(
    peer: Peer,
    files: Sequence[Path],
    *,
    calling_ae: str,
    settings: DispatchSettings,
    associations: OpenAssociations | None = None,
) -> list[SendOutcome]:
    """C-STORE ``files`` to ``peer`` in one association; one outcome per file, in their order.

    Proposes one presentation context per (SOP class, transfer syntax) the files need, and
    nothing else. Never raises for a peer's behaviour: every file gets an outcome. The
    association is tracked in ``associations`` while it is open (see
    :class:`OpenAssociations`); after their :meth:`~OpenAssociations.abort_all`, no
    association is opened and the files' outcomes say so (status ``None``).
    """
    contexts: dict[tuple[str, str], None] = {}
    outcomes: dict[int, SendOutcome] = {}
    readable: list[int] = []
    for k, path in enumerate(files):
        try:
            meta = read_file_meta_info(path)
        except (OSError, InvalidDicomError) as exc:
            outcomes[k] = SendOutcome(path, False, None, f"cannot read file: {exc}")
            continue
        contexts[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
        readable.append(k)
    sent = _send_readable(
        peer,
        [files[k] for k in readable],
        contexts,
        calling_ae=calling_ae,
        settings=settings,
        associations=associations,
    )
    outcomes.update(zip(readable, sent, strict=True))
    return [outcomes[k] for k in range(len(files))]


def _send_readable(
    peer: Peer,
    files: list[Path],
    contexts: dict[tuple[str, str], None],
    *,
    calling_ae: str,
    settings: DispatchSettings,
    associations: OpenAssociations | None,
) -> list[SendOutcome]:
    if not files:
        return []
    if associations is not None and associations.aborted:
        return [SendOutcome(p, False, None, "not sent: the node is stopping") for p in files]
    try:
        tls_args = _tls_args(peer)
    except ConfigError as exc:
        return [SendOutcome(p, False, None, str(exc)) for p in files]
    ae = _ae(calling_ae, settings)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, _syntaxes_for(syntax))
    assoc, no_connection = _associate(ae, peer, tls_args, associations)
    try:
        _tune_socket(assoc, settings)
        if not assoc.is_established:
            why = _why_not_established(assoc, no_connection)
            return [SendOutcome(p, False, None, why) for p in files]
        outcomes = []
        try:
            for path in files:
                if _alive(assoc):
                    outcomes.append(_store_one(assoc, path, peer))
                else:
                    outcomes.append(SendOutcome(path, False, None, "association ended early"))
        finally:
            if _alive(assoc):
                assoc.release()
        return outcomes
    finally:
        if associations is not None:
            associations.discard(assoc)


def _tune_socket(assoc: Association, settings: DispatchSettings) -> None:
    """Nagle's algorithm off, and a timeout on every read and write of the association's socket.

    pynetdicom leaves Nagle on (a C-STORE then waits ~40 ms for the peer's delayed ACK before
    its last segment goes out) and clears the socket's timeout once connected: a peer that
    stops half-way through a PDU would hold the sending thread in ``recv`` for good, beyond
    every pynetdicom timeout. With ``network_timeout_seconds`` on the socket the read fails,
    the association is aborted and the delivery retried.
    """
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: the send will report it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(settings.network_timeout_seconds)


def _alive(assoc: Association) -> bool:
    return bool(assoc.is_established)


def _store_one(assoc: Association, path: Path, peer: Peer) -> SendOutcome:
    try:
        dataset = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        return SendOutcome(path, False, None, f"cannot read file: {exc}")
    try:
        rsp = assoc.send_c_store(dataset)
    except ValueError as exc:  # pynetdicom: the peer accepted no context for this SOP class
        return SendOutcome(path, False, None, f"not accepted by the peer: {exc}")
    if "Status" not in rsp:
        return SendOutcome(path, False, None, "no response (timeout or abort)")
    status = int(rsp.Status)
    category = code_to_category(status)
    if category == "Warning":
        logger.warning(
            "peer stored a result with a warning",
            extra={"fields": {"peer": peer.name, "status": f"0x{status:04X}"}},
        )
    if category in ("Success", "Warning"):
        return SendOutcome(path, True, status, category.lower())
    comment = str(rsp.get("ErrorComment", "") or "")
    detail = f"{category.lower()} status 0x{status:04X}" + (f" ({comment})" if comment else "")
    return SendOutcome(path, False, status, detail)


def echo(peer: Peer, *, calling_ae: str, settings: DispatchSettings) -> tuple[bool, str]:
    """C-ECHO ``peer``: ``(answered with success, detail)``."""
    try:
        tls_args = _tls_args(peer)
    except ConfigError as exc:
        return False, str(exc)
    ae = _ae(calling_ae, settings)
    ae.add_requested_context(VERIFICATION)
    assoc, no_connection = _associate(ae, peer, tls_args)
    _tune_socket(assoc, settings)
    if not assoc.is_established:
        return False, _why_not_established(assoc, no_connection)
    try:
        rsp = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    status = int(rsp.Status) if "Status" in rsp else None
    if status is None:
        return False, "no response"
    return status == 0, f"status 0x{status:04X}"
