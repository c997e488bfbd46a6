"""The C-STORE SCP: associations, C-ECHO, and C-STORE of received instances into the spool.

The handler is thin: it reads only the header fields that file an instance, writes the bytes as
received to the spool (fsynced), records them in the job store and only then answers success.
It never decodes pixels. This module is the one place where exceptions become DICOM statuses.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import time
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.tag import Tag
from pydicom.uid import JPEG2000, UID, ExplicitVRLittleEndian, JPEGLSNearLossless
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import _STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import MANUFACTURER
from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.errors import (
    DatasetError,
    DatasetMismatchError,
    InvalidUIDError,
    NodeError,
    OutOfResourcesError,
)
from dicom_node.logs import study_key
from dicom_node.metrics import ASSOCIATIONS, BYTES, INSTANCES, SECURITY_EVENTS
from dicom_node.receive.filemeta import file_meta_bytes
from dicom_node.receive.identify import Identity, identify
from dicom_node.receive.limits import (
    Admission,
    ConnectionLimits,
    EventGate,
    GuardedAssociationServer,
)
from dicom_node.receive.status import StoreStatus
from dicom_node.receive.tls import certificate_names, server_context
from dicom_node.store.jobs import InstanceRecord, JobStore, Recorded
from dicom_node.store.spool import Spool
from dicom_node.study.completion import Completion
from dicom_node.study.volume import DECODING_PLUGINS

logger = logging.getLogger(__name__)

#: SOP classes whose instances are spooled for analysis.
ANALYSED_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"})
#: What this node produces (Segmentation, Comprehensive 3D SR): recognised when routed back.
OUTPUT_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"})

VERIFICATION = "1.2.840.10008.1.1"
_DUL_POLL_SECONDS = 0.0002


def _same_content(known: tuple[Path, int, str | None], raw: bytes, digest: str) -> bool:
    """True when ``raw`` is the data set acknowledged for the instance (an identical re-send):
    by the digest recorded with it; for a record from before digests, by the spooled file."""
    path, size, recorded = known
    if size != len(raw):
        return False
    if recorded is not None:
        return recorded == digest
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    return data.endswith(raw)


def _same_in_another_syntax(known: tuple[Path, int, str | None], whole: bytes, syntax: str) -> bool:
    """True when ``whole`` (a Part 10 file of the new data set, in transfer syntax ``syntax``)
    is the instance acknowledged before in another one: every attribute equal, and the pixels
    once decoded. A PACS that stores compressed forwards a study a modality sent it
    uncompressed: the same images, other bytes, which must not re-open the study and analyse
    it again. Anything that cannot be compared (a file gone, pixel data that does not decode)
    counts as new content."""
    try:
        if str(read_file_meta_info(known[0]).TransferSyntaxUID) == syntax:
            return False  # the same encoding, other bytes: new content
        before = pydicom.dcmread(known[0])
        now = pydicom.dcmread(BytesIO(whole))
        tags = {e.tag for e in before}
        if tags != {e.tag for e in now}:
            return False
        if any(before[t].value != now[t].value for t in tags if t != _PIXEL_DATA) and (
            _implicit_encoding(before) != _implicit_encoding(now)
        ):  # (read in implicit VR, a private element is bytes; in explicit VR, text)
            return False
        return _PIXEL_DATA not in tags or bool(np.array_equal(before.pixel_array, now.pixel_array))
    except Exception:  # noqa: BLE001 - whatever stops the comparison, the content is taken as new
        return False


_PIXEL_DATA = Tag(0x7FE0, 0x0010)


def _implicit_encoding(ds: Dataset) -> bytes:
    """A data set's elements but its pixel data, encoded in implicit VR little endian: the
    same bytes for the same content whichever syntax it was read from."""
    without = Dataset()
    for element in ds:
        if element.tag != _PIXEL_DATA:
            without.add(element)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, without)
    return bytes(buffer.getvalue())


def decodable_transfer_syntaxes() -> list[UID]:
    """Transfer syntaxes accepted at negotiation: those whose pixel data the node decodes.

    :data:`~dicom_node.study.volume.DECODING_PLUGINS` pins the decoder of each; a compressed
    syntax is accepted only while its pinned plug-in is installed, so a study is never
    acknowledged in an encoding the analysis cannot read.
    """
    usable = [
        UID(uid)
        for uid, plugin in DECODING_PLUGINS.items()
        if not plugin or plugin in get_decoder(uid).available_plugins
    ]
    # pynetdicom accepts, of the syntaxes a peer proposes in one context, the first in this
    # list: explicit VR little endian first, as most senders expect, then the other native
    # ones, the lossless compressed ones, and last those that may be lossy (a sender that
    # transcodes to what was accepted should not lose what it has)
    return sorted(
        usable,
        key=lambda uid: (
            uid != ExplicitVRLittleEndian,
            uid.is_compressed,
            uid in (JPEGLSNearLossless, JPEG2000),
        ),
    )


class Receiver:
    """The DICOM listener of the node.

    Parameters
    ----------
    config
        The node's configuration (``node`` and ``storage`` sections are used).
    spool, store
        Where instances go.
    completion
        Told of every filed instance and of every association's end.
    """

    def __init__(
        self,
        config: Config,
        *,
        spool: Spool,
        store: JobStore,
        completion: Completion,
        audit: AuditLog | None = None,
    ) -> None:
        self.audit = audit or AuditLog(None)
        #: Per association: instances acknowledged, and of those identical re-sends, by study.
        self._tally: dict[int, Counter[str]] = {}
        self._resent: dict[int, Counter[str]] = {}
        #: Per association over TLS with a client certificate: the name it carries.
        self._certificates: dict[int, str] = {}
        #: Established associations not yet over (released, aborted or closed), by id.
        self._live: dict[int, Association] = {}
        self._live_lock = threading.Lock()
        self.config = config
        #: What is kept for analysis: CT and Enhanced CT, and the SOP classes the selection
        #: rules are set to analyse (Legacy Converted Enhanced CT, say).
        self._analysed = ANALYSED_SOP_CLASSES | frozenset(config.selection.sop_classes)
        self.spool = spool
        self.store = store
        self.completion = completion
        self._server: ThreadedAssociationServer | None = None
        self._accept: threading.Thread | None = None
        self._stripes = [threading.Lock() for _ in range(64)]
        self._own_root = config.uid_root + "." if config.uid_root != "2.25" else None
        self.dropped: Counter[str] = Counter()
        node = config.node
        self.limits = ConnectionLimits(
            # a TCP probe that connects and closes holds its slot until the ACSE timeout
            max_pending=2 * node.max_associations,
            handshake_seconds=node.acse_timeout_seconds,
            pdu_seconds=node.network_timeout_seconds,
            max_pdata_bytes=node.max_pdu_bytes,
            max_dataset_bytes=node.max_dataset_mb * 1024 * 1024,
        )
        self._admission = Admission(
            total=node.max_associations, per_caller=node.max_associations_per_caller
        )
        self._gate = EventGate()
        # built now, so that a bad certificate or key fails the start before the port is bound
        self._ssl = None if node.tls is None else server_context(node.tls)
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu_bytes
        # the limits are ours (EVT_REQUESTED, GuardedAssociationServer); pynetdicom's own count
        # includes connections not yet associated, so it only backs ours up
        ae.maximum_associations = node.max_associations + self.limits.max_pending
        ae.network_timeout = node.network_timeout_seconds
        ae.acse_timeout = node.acse_timeout_seconds
        ae.dimse_timeout = node.dimse_timeout_seconds
        ae.require_called_aet = True
        syntaxes = decodable_transfer_syntaxes()
        ae.add_supported_context(VERIFICATION)
        for uid in _STORAGE_CLASSES.values():
            ae.add_supported_context(uid, syntaxes)
        return ae

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        if self._server is None:
            raise RuntimeError("receiver not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind the port and start accepting associations (in background threads)."""
        node = self.config.node
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        try:
            server = self.ae.make_server(
                (node.host, node.port),
                evt_handlers=handlers,
                server_class=GuardedAssociationServer,
                ssl_context=self._ssl,
                limits=self.limits,
                report=self.security_event,
            )
        except OSError as exc:
            hint = (
                " (a port below 1024 needs CAP_NET_BIND_SERVICE, as the systemd unit grants,"
                " or root)"
                if isinstance(exc, PermissionError)
                else ""
            )
            raise NodeError(
                f"cannot listen on {node.host}:{node.port}: {exc.strerror}{hint}"
            ) from exc
        self._server = server
        self.ae._servers.append(server)  # so that AE.shutdown() and server.shutdown() know it
        self._accept = threading.Thread(
            target=self._server.serve_forever, name="dicom-accept", daemon=True
        )
        self._accept.start()
        logger.info(
            "listening",
            extra={
                "fields": {
                    "ae_title": node.ae_title,
                    "host": node.host,
                    "port": self.port,
                    "tls": node.tls is not None,
                }
            },
        )

    def server_thread_alive(self) -> bool:
        """True while the listening socket is open and its accept loop runs."""
        return self._server is not None and self._accept is not None and self._accept.is_alive()

    def stop(self, *, drain_seconds: float = 10.0) -> None:
        """Stop accepting associations; let open ones finish for up to ``drain_seconds``."""
        server = self._server
        if server is None:
            return
        # stops the accept loop and closes the listening socket; open associations go on
        server.shutdown()
        if self._accept is not None:
            self._accept.join(5)
        deadline = time.monotonic() + drain_seconds
        # established associations may finish what they send; a connection that never asked
        # for an association (a port probe, a stalled peer) is not worth waiting for
        while (
            any(a.is_established for a in server.active_associations)
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        for assoc in server.active_associations:
            if assoc.is_established:
                logger.warning("aborting an association still open after the drain period")
            assoc.abort()
        self.ae.shutdown()
        self._server = None

    # -- association events ---------------------------------------------------------------------

    def _on_requested(self, event: Event) -> None:
        # pynetdicom's DUL thread polls its socket and queues with a 1 ms sleep; on a C-STORE
        # that latency is paid on every instance. A shorter poll costs a little CPU per open
        # association and buys ~30% ingest throughput on one association (bench/ingest.py).
        event.assoc.dul._run_loop_delay = _DUL_POLL_SECONDS
        self.reap()
        request = cast(A_ASSOCIATE, event.assoc.requestor.primitive)
        calling = str(request.calling_ae_title).strip()
        address = event.assoc.requestor.address
        names = certificate_names(getattr(event.assoc.dul.socket, "socket", None))
        if names:
            self._certificates[id(event.assoc)] = names[0]
        allowed = self.config.node.allowed_callers
        host = _canonical_address(address)
        if allowed and not any(
            c.ae_title.strip() == calling
            and (c.host is None or _canonical_address(c.host) == host)
            and (c.certificate_name is None or c.certificate_name in names)
            for c in allowed
        ):
            self.security_event(
                "caller_not_allowed",
                "calling AE not allowed; association rejected",
                audit_reason="calling AE not allowed",
                calling_ae=calling,
                peer=address,
                called_ae=self.ae.ae_title,
                **({"certificate": names[0]} if names else {}),
            )
            # rejected-permanent, service-user, calling AE title not recognised
            self._reject(event, 0x01, 0x01, 0x03)
            return
        refused = self._admission.admit(event.assoc, calling)
        if refused is not None:
            node = self.config.node
            limit = (
                node.max_associations
                if refused == "association_limit"
                else node.max_associations_per_caller
            )
            self.security_event(
                refused,
                f"{refused.replace('_', ' ')} reached; association rejected",
                calling_ae=calling,
                peer=address,
                limit=limit,
            )
            # rejected-transient, service-provider (presentation), local-limit-exceeded
            self._reject(event, 0x02, 0x03, 0x02)

    def _reject(self, event: Event, result: int, source: int, reason: int) -> None:
        self._certificates.pop(id(event.assoc), None)
        event.assoc.acse.send_reject(result, source, reason)
        ASSOCIATIONS.labels("rejected").inc()
        event.assoc.kill()  # waits for the DUL to send the A-ASSOCIATE-RJ before closing

    def security_event(
        self, code: str, message: str, *, audit_reason: str | None = None, **fields: Any
    ) -> None:
        """Count, audit and log a security event (rejected caller, failed TLS, a limit hit).

        ``code`` labels the ``dicom_node_security_events`` counter (every event counts); the
        audit record and the log line are held back when one peer repeats one event more than
        :class:`~dicom_node.receive.limits.EventGate` lets through.
        """
        SECURITY_EVENTS.labels(code).inc()
        held = self._gate.allow(code, str(fields.get("peer")))
        if held is None:
            return
        if held:
            fields["held_back"] = held
        self.audit.security(audit_reason or message, code=code, **fields)
        logger.warning(
            "security event: %s",
            message,
            extra={"fields": {"code": code, **fields, "security": True}},
        )

    def _on_established(self, event: Event) -> None:
        with self._live_lock:
            self._live[id(event.assoc)] = event.assoc
        ASSOCIATIONS.labels("established").inc()

    def _on_rejected(self, event: Event) -> None:
        """An association pynetdicom rejected itself (ours are rejected in _on_requested and
        reported there): a wrong called AE title, or an application context it does not know."""
        self._admission.leave(event.assoc)
        self._certificates.pop(id(event.assoc), None)
        ASSOCIATIONS.labels("rejected").inc()
        request = cast(A_ASSOCIATE, event.assoc.requestor.primitive)
        called = str(request.called_ae_title).strip()
        wrong_called = called != self.ae.ae_title.strip()
        self.security_event(
            "called_ae_not_recognised" if wrong_called else "association_rejected",
            "called AE not recognised; association rejected"
            if wrong_called
            else "association rejected",
            calling_ae=str(request.calling_ae_title).strip(),
            called_ae=called,
            peer=event.assoc.requestor.address,
        )

    def _association_over(self, assoc: Association, *, released: bool) -> None:
        """The end of an association: admission, metrics, the audit record of what it sent,
        and study completion (each of which holds for an association once)."""
        with self._live_lock:
            self._live.pop(id(assoc), None)
        self._admission.leave(assoc)
        ASSOCIATIONS.labels("released" if released else "aborted").inc()
        tally = self._tally.pop(id(assoc), None)
        resent = self._resent.pop(id(assoc), None)
        certificate = self._certificates.pop(id(assoc), None)
        if tally:
            self.audit.received(
                calling_ae=assoc.requestor.ae_title.strip(),
                peer=assoc.requestor.address,
                studies=dict(tally),
                outcome="success" if released else "association aborted",
                **({"duplicates": dict(resent)} if resent else {}),
                **({"certificate": certificate} if certificate else {}),
            )
        self.completion.association_ended(id(assoc), released=released)

    def _count(self, assoc: Association, study_uid: str, *, duplicate: bool = False) -> None:
        """Count an acknowledged instance (and whether it was an identical re-send, not stored
        again) for the association's audit record. The first of a study in an association is
        audited at once (Begin Transferring DICOM Instances), so that a crash before the
        association ends still leaves who sent which study."""
        key = id(assoc)
        if study_uid not in self._tally.get(key, ()):
            self.audit.begin_receiving(
                calling_ae=assoc.requestor.ae_title.strip(),
                peer=assoc.requestor.address,
                study=study_uid,
                certificate=self._certificates.get(key),
            )
        self._tally.setdefault(key, Counter())[study_uid] += 1
        if duplicate:
            self._resent.setdefault(key, Counter())[study_uid] += 1

    def _on_released(self, event: Event) -> None:
        self._association_over(event.assoc, released=True)

    def _on_aborted(self, event: Event) -> None:
        self._association_over(event.assoc, released=False)

    def reap(self) -> int:
        """End, as aborted, every established association whose thread has ended without
        pynetdicom saying so (its DUL thread failed on a malformed PDU: no release or abort
        event comes). Called on each new association and by the node's housekeeping loop;
        returns how many."""
        with self._live_lock:
            gone = [a for a in self._live.values() if a.ident is not None and not a.is_alive()]
        for assoc in gone:
            logger.warning("an association ended without release or abort; counted as aborted")
            self._association_over(assoc, released=False)
        return len(gone)

    # -- C-STORE --------------------------------------------------------------------------------

    def _on_store(self, event: Event) -> Dataset:
        req = cast(C_STORE, event.request)
        raw = cast(BytesIO, req.DataSet).getvalue()
        status, comment = self._store(event, raw)
        rsp = Dataset()
        rsp.Status = int(status)
        if comment:
            rsp.ErrorComment = comment[:64]
        return rsp

    def _store(  # noqa: PLR0911 - the one place where each error becomes its status
        self, event: Event, raw: bytes
    ) -> tuple[StoreStatus, str | None]:
        req = cast(C_STORE, event.request)
        calling = event.assoc.requestor.ae_title.strip()
        try:
            ident = identify(
                raw,
                event.context.transfer_syntax,
                command_sop_class=str(req.AffectedSOPClassUID),
                command_sop_instance=str(req.AffectedSOPInstanceUID),
                needs_pixel_data=str(req.AffectedSOPClassUID) in self._analysed,
                max_dataset_bytes=self.config.node.max_dataset_mb * 1024 * 1024,
            )
            outcome = self._file(event, ident, raw, calling)
        except OutOfResourcesError as exc:
            return self._refuse("out_of_resources", raw, StoreStatus.OUT_OF_RESOURCES, exc, calling)
        except DatasetMismatchError as exc:
            return self._refuse("mismatch", raw, StoreStatus.DATASET_MISMATCH, exc, calling)
        except InvalidUIDError as exc:
            return self._refuse("invalid_uid", raw, StoreStatus.INVALID_IDENTIFIERS, exc, calling)
        except DatasetError as exc:
            return self._refuse("unparseable", raw, StoreStatus.CANNOT_PARSE, exc, calling)
        except Exception as exc:
            logger.error(  # noqa: TRY400 - its text may hold spool paths (UIDs): a trace only in DEBUG
                "C-STORE failed (%s)",
                type(exc).__name__,
                exc_info=logger.isEnabledFor(logging.DEBUG),
                extra={"fields": {"calling_ae": calling}},
            )
            return self._refuse("error", raw, StoreStatus.PROCESSING_FAILURE, exc, calling)
        INSTANCES.labels(outcome).inc()
        BYTES.labels(outcome).inc(len(raw))
        if outcome == "refused_not_ct":
            return StoreStatus.SOP_CLASS_NOT_SUPPORTED, "only CT is accepted here"
        return StoreStatus.SUCCESS, None

    def _refuse(
        self, outcome: str, raw: bytes, status: StoreStatus, exc: Exception, calling: str
    ) -> tuple[StoreStatus, str]:
        INSTANCES.labels(f"failed_{outcome}").inc()
        BYTES.labels(f"failed_{outcome}").inc(len(raw))
        if status != StoreStatus.PROCESSING_FAILURE:
            logger.warning(
                "C-STORE refused: %s",
                exc,
                extra={"fields": {"status": f"0x{status:04X}", "calling_ae": calling}},
            )
        return status, str(exc)

    def _is_own_output(self, ident: Identity) -> bool:
        if ident.manufacturer == MANUFACTURER:
            return True
        return self._own_root is not None and ident.sop_instance_uid.startswith(self._own_root)

    def _file(self, event: Event, ident: Identity, raw: bytes, calling: str) -> str:
        if ident.sop_class_uid not in self._analysed:
            if self._is_own_output(ident) or (
                ident.sop_class_uid in OUTPUT_SOP_CLASSES and (ident.manufacturer == MANUFACTURER)
            ):
                reason = "dropped_own_output"
            elif self.config.node.other_instances == "reject":
                reason = "refused_not_ct"
            else:
                reason = "dropped_not_ct"
            self.dropped[reason] += 1
            logger.info(
                "instance not kept (%s)",
                reason.removeprefix("dropped_").removeprefix("refused_").replace("_", " "),
                extra={"fields": {"sop_class": ident.sop_class_uid, "calling_ae": calling}},
            )
            return reason

        path = self.spool.path_for(ident.study_uid, ident.series_uid, ident.sop_instance_uid)
        # Before the study exists in the store: an association of the same study released
        # meanwhile must not complete it while this one is still filing (complete_on_release).
        self.completion.instance_received(id(event.assoc), ident.study_uid)
        stripe = self._stripes[hash(ident.sop_instance_uid) % len(self._stripes)]
        digest = hashlib.sha256(raw).hexdigest()
        with self.spool.filing(), stripe:
            known = self.store.instance_location(ident.sop_instance_uid)
            syntax = str(event.context.transfer_syntax)
            head = file_meta_bytes(
                sop_class_uid=ident.sop_class_uid,
                sop_instance_uid=ident.sop_instance_uid,
                transfer_syntax_uid=syntax,
                source_ae_title=calling,
            )
            if known is not None and (
                _same_content(known, raw, digest)
                or _same_in_another_syntax(known, head + raw, syntax)
            ):
                self._count(event.assoc, ident.study_uid, duplicate=True)
                return "duplicate"
            # new content for an instance at the same place: the old file is kept aside until
            # the store has the new record, so that a refused one leaves what was acknowledged
            replacing = known is not None and known[0] == path
            previous = self.spool.keep_aside(path) if replacing else None
            self.spool.store(raw, path, head=head)
            try:
                recorded = self.store.record_instance(
                    InstanceRecord(
                        sop_instance_uid=ident.sop_instance_uid,
                        study_uid=ident.study_uid,
                        series_uid=ident.series_uid,
                        sop_class_uid=ident.sop_class_uid,
                        modality=ident.modality,
                        path=path,
                        size=len(raw),
                        calling_ae=calling,
                        received_at=time.time(),
                        digest=digest,
                    )
                )
            except Exception:
                if previous is not None:  # refused: the acknowledged content comes back
                    self.spool.put_back(previous, path)
                else:  # refused: not left for the next start to index and process
                    self.spool.remove(path)
                raise
            if previous is not None:
                previous.unlink(missing_ok=True)
            elif known is not None and known[0] != path:
                # the same instance moved to another study or series: its old file goes once
                # the store has the new place (a crash before leaves the old one recorded)
                self.spool.remove(known[0])
        self._count(event.assoc, ident.study_uid)
        if recorded is Recorded.REPLACED:
            logger.info(
                "instance replaced by different content; study re-opened",
                extra={"fields": {"study": study_key(ident.study_uid)}},
            )
            return "replaced"
        return "stored"


def _canonical_address(text: str) -> str:
    """An IP address in one form: an IPv4 peer on a dual-stack listener (``::``) arrives as
    ``::ffff:127.0.0.1`` and is the same host as ``127.0.0.1``; text that is no address stays
    as it is."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
