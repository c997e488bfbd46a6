"""The C-STORE and C-ECHO SCU: one association per batch, proposing exactly what it sends."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
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
    ae: AE, peer: Peer, tls_args: tuple[ssl.SSLContext, str] | None
) -> tuple[Association, str | None]:
    """Associate with ``peer``; and, when no connection was made, why (pynetdicom marks an
    association aborted whether the peer aborted it or no connection was ever made)."""
    opened: list[bool] = []
    failures = _recording_handshakes(tls_args[0]) if tls_args is not None else []
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: opened.append(True))],
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
    peer: Peer, files: Sequence[Path], *, calling_ae: str, settings: DispatchSettings
) -> list[SendOutcome]:
    """C-STORE ``files`` to ``peer`` in one association; one outcome per file, in their order.

    Proposes one presentation context per (SOP class, transfer syntax) the files need, and
    nothing else. Never raises for a peer's behaviour: every file gets an outcome.
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
        peer, [files[k] for k in readable], contexts, calling_ae=calling_ae, settings=settings
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
) -> list[SendOutcome]:
    if not files:
        return []
    try:
        tls_args = _tls_args(peer)
    except ConfigError as exc:
        return [SendOutcome(p, False, None, str(exc)) for p in files]
    ae = _ae(calling_ae, settings)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, _syntaxes_for(syntax))
    assoc, no_connection = _associate(ae, peer, tls_args)
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
