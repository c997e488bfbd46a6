"""The dispatcher: drains the outbox, one thread per destination with work due.

Destinations are independent: a refusing or slow PACS only occupies its own thread, so it never
holds back another destination or the analysis of other studies. At the node's stop, sends still
in flight once the drain time is spent are aborted (:meth:`Dispatcher.abort`); their rows go
back to ``pending``, their attempt not counted, and are sent at the next start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.dispatch.routing import resolve
from dicom_node.dispatch.scu import ABORT_SECONDS, OpenAssociations, Peer, SendOutcome, send_files
from dicom_node.metrics import SENDS
from dicom_node.store.jobs import until_recorded
from dicom_node.store.outbox import DeliveryState, Outbox, OutboxItem

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class Dispatcher:
    """Sends outbox rows to their destinations, with retries handled by :class:`Outbox`."""

    def __init__(self, config: Config, outbox: Outbox, audit: AuditLog | None = None) -> None:
        self.audit = audit or AuditLog(None)
        self.config = config
        self.outbox = outbox
        self.wake = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._associations = OpenAssociations()

    def run_forever(self, stop: threading.Event) -> None:
        """Start a drain thread for each destination with rows due, until ``stop`` is set. A
        pass that fails (the job store unreadable for a moment) is logged, and the next one
        comes after the usual pause."""
        while not stop.is_set():
            try:
                self.kick(stop)
            except Exception:  # keep dispatching: results must not wait for a restart
                logger.exception("the dispatch loop failed; trying again")
            self.wake.wait(self.config.dispatch.poll_seconds)
            self.wake.clear()

    def kick(self, stop: threading.Event | None = None) -> None:
        """Start draining every destination that has work due and no thread yet."""
        for name in self.outbox.due_destinations():
            with self._lock:
                running = self._threads.get(name)
                if running is not None and running.is_alive():
                    continue
                t = threading.Thread(
                    target=self.drain, args=(name, stop), name=f"send-{name}", daemon=True
                )
                self._threads[name] = t
                t.start()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` in all for the drain threads in flight (used at shutdown)."""
        deadline = time.monotonic() + timeout
        for t in list(self._threads.values()):
            t.join(max(0.0, deadline - time.monotonic()))

    def busy(self) -> bool:
        """Whether a drain thread is still running."""
        return any(t.is_alive() for t in list(self._threads.values()))

    def abort(self, timeout: float = ABORT_SECONDS + 3.0) -> None:
        """End the sends still in flight (the node stops and its drain time is spent): their
        associations are aborted (A-ABORT) and no new one is opened. The rows they carried go
        back to ``pending`` with their attempt not counted (the PACS did not refuse them), to
        be sent at the next start. Waits up to ``timeout`` for the drain threads to record
        that; rows a thread could not put back stay ``sending`` until the next start's
        :meth:`~dicom_node.store.outbox.Outbox.recover`, which does the same."""
        deadline = time.monotonic() + timeout
        aborted = self._associations.abort_all()
        if aborted:
            logger.warning(
                "the node stops: %d association(s) still sending aborted; their results are"
                " sent at the next start",
                aborted,
            )
        self.join(max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _record(
        write: Callable[..., _T], *args: Any, stop: threading.Event | None, **kwargs: Any
    ) -> _T:
        """``write(*args, **kwargs)`` on the job store, however long it cannot take it for now
        (:func:`~dicom_node.store.jobs.until_recorded`)."""
        return until_recorded(lambda: write(*args, **kwargs), what="a delivery's state", stop=stop)

    def _send(
        self,
        name: str,
        peer: Peer,
        items: list[OutboxItem],
        stop: threading.Event | None,
    ) -> list[tuple[OutboxItem, DeliveryState]]:
        """Send ``items`` in one association and record each outcome; the items that failed,
        with their new state."""
        try:
            outcomes = send_files(
                peer,
                [i.path for i in items],
                calling_ae=self.config.node.ae_title,
                settings=self.config.dispatch,
                associations=self._associations,
            )
        except Exception as exc:  # whatever it was, the rows retry with backoff
            logger.exception("sending failed", extra={"fields": {"destination": name}})
            outcomes = [SendOutcome(i.path, False, None, type(exc).__name__) for i in items]
        stopped = self._associations.aborted
        failed = []
        for item, outcome in zip(items, outcomes, strict=True):
            # cut off by the node's stop (no answer from the PACS), not refused
            cut_off = stopped and not outcome.delivered and outcome.status is None
            why = "aborted: the node stopped" if cut_off else outcome.detail
            try:
                self.audit.sent(
                    destination=name,
                    ae_title=peer.ae_title,
                    host=peer.host,
                    port=peer.port,
                    job=item.job_id,
                    sop_instance_uid=item.sop_instance_uid,
                    sop_class_uid=item.sop_class_uid,
                    outcome="success" if outcome.delivered else why,
                )
            except Exception:  # the delivery happened whether or not it could be audited
                logger.exception("the audit record of a delivery could not be written")
            if outcome.delivered:
                self._record(self.outbox.delivered, item.id, outcome.status or 0, stop=stop)
                SENDS.labels(name, "delivered").inc()
                continue
            if cut_off:  # left claimed, for the batch's unclaim to put back, attempt not counted
                continue
            state = self._record(
                self.outbox.failed, item.id, outcome.detail, outcome.status, stop=stop
            )
            SENDS.labels(name, "dead" if state == DeliveryState.DEAD else "failed").inc()
            logger.warning(
                "delivery failed (%s)%s",
                outcome.detail,
                "; dead-lettered" if state == DeliveryState.DEAD else "; will retry",
                extra={"fields": {"destination": name, "job": item.job_id}},
            )
            failed.append((item, state))
        return failed

    def _send_in_waves(
        self, name: str, peer: Peer, items: list[OutboxItem], stop: threading.Event | None
    ) -> bool:
        """Send a claimed batch, a study's versions in waves, oldest first (claim orders them
        so): a newer version's results go only once the older one's of that study went
        through. Refused and to be tried again, the older one holds its study's newer ones
        back (:meth:`Outbox.failed` defers them; they are left claimed here, for the caller
        to put back). Whether any item failed."""
        study = self.outbox.studies_of({i.job_id for i in items})
        held: set[str] = set()  # studies with a refused older version to be tried again
        retry_later = False
        for wave_items in _waves(items, study):
            if self._associations.aborted:
                return True  # the node stops: the rest stays claimed, for the caller to put back
            to_send = [i for i in wave_items if study[i.job_id] not in held]
            if not to_send:
                continue
            for item, state in self._send(name, peer, to_send, stop):
                retry_later = True
                if state == DeliveryState.PENDING:  # (a dead one holds nothing back)
                    held.add(study[item.job_id])
        return retry_later

    def drain(self, name: str, stop: threading.Event | None = None) -> None:
        """Send everything due for one destination, batch by batch. What is recorded after a
        send (the audit record, the delivery's new state) cannot end the thread with rows
        claimed: an audit log that cannot be written is logged, and a job store that refuses a
        state is tried again until it takes it (or the node stops: rows left ``sending`` go
        back to ``pending`` at the next start). After :meth:`abort`, what the batch did not
        deliver goes back to ``pending`` with its attempt not counted."""
        while (stop is None or not stop.is_set()) and not self._associations.aborted:
            items = self._record(self.outbox.claim, name, stop=stop)
            if not items:
                return
            peer = resolve(self.config, name)
            if peer is None:  # trying again cannot help: dead-lettered at once, with the reason
                for item in items:
                    self._record(
                        self.outbox.failed,
                        item.id,
                        f"destination {name!r} is no longer configured",
                        hopeless=True,
                        stop=stop,
                    )
                continue
            try:
                retry_later = self._send_in_waves(name, peer, items, stop)
            finally:  # whatever ended the batch, nothing is left claimed and unsent
                self._record(self.outbox.unclaim, [i.id for i in items], stop=None)
            if retry_later:
                return  # the rest waits for its backoff; other destinations are unaffected


def _waves(items: list[OutboxItem], study: dict[int, str]) -> list[list[OutboxItem]]:
    """``items`` (oldest job first) in waves: the first holds each study's oldest version in
    the batch, the next its next version, and so on."""
    waves: list[list[OutboxItem]] = []
    versions: dict[str, list[int]] = {}
    for item in items:
        jobs = versions.setdefault(study[item.job_id], [])
        if item.job_id not in jobs:
            jobs.append(item.job_id)
        wave = jobs.index(item.job_id)
        while len(waves) <= wave:
            waves.append([])
        waves[wave].append(item)
    return waves
