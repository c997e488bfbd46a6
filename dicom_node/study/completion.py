"""Study completion: when a study has stopped arriving and becomes a job.

A study is complete after ``stable_seconds`` without a new instance, or ``max_wait_seconds``
after it started (re-)arriving, or, with ``complete_on_release``, when the association that sent
it is released and no other open association has sent to it. Associations are tracked per
association, so studies interleaved across associations are never completed early.

Time counts only while the node listens: nothing completes by time until ``stable_seconds`` after
the node's start, and the maximum wait of a study that was arriving before it counts from the
start. A study left receiving by a crash or a stop, whose sender's association was cut, is given
a quiet period to send the rest before the part already spooled becomes a job, however long the
node was down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from dicom_node.config import StudySettings
from dicom_node.logs import study_key
from dicom_node.metrics import STUDIES_COMPLETED
from dicom_node.store.jobs import Job, JobStore

logger = logging.getLogger(__name__)


class Completion:
    """Decides when studies are complete and queues their jobs.

    Parameters
    ----------
    store
        The job store.
    settings
        The ``study`` section of the configuration.
    on_job
        Called with each job queued (wakes the worker).
    clock
        Seconds since the epoch; injectable for tests of the timing rules.
    """

    def __init__(
        self,
        store: JobStore,
        settings: StudySettings,
        *,
        on_job: Callable[[Job], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.on_job = on_job
        self.clock = clock
        self.listening_since = clock()
        self._lock = threading.Lock()
        self._by_assoc: dict[int, set[str]] = {}
        self._open: Counter[str] = Counter()

    def listening(self) -> None:
        """The node starts to receive now: the timing rules wait one quiet period from here."""
        self.listening_since = self.clock()

    def instance_received(self, assoc: int, study_uid: str) -> None:
        """Note that association ``assoc`` sent an instance of ``study_uid``."""
        with self._lock:
            studies = self._by_assoc.setdefault(assoc, set())
            if study_uid not in studies:
                studies.add(study_uid)
                self._open[study_uid] += 1

    def association_ended(self, assoc: int, *, released: bool) -> list[Job]:
        """An association was released (or aborted); complete what it alone was sending."""
        with self._lock:
            studies = self._by_assoc.pop(assoc, set())
            alone = []
            for uid in studies:
                self._open[uid] -= 1
                if self._open[uid] <= 0:
                    del self._open[uid]
                    alone.append(uid)
        if not (released and self.settings.complete_on_release):
            return []
        return [j for uid in alone if (j := self._complete(uid, "association released"))]

    def scan(self) -> list[Job]:
        """Complete every study that has been quiet long enough or waited too long."""
        now = self.clock()
        if now - self.listening_since < self.settings.stable_seconds:
            return []  # a sender cut off by the node's stop has not had a quiet period to resume
        jobs = []
        for uid, since, last in self.store.receiving_studies():
            if now - last >= self.settings.stable_seconds:
                job = self._complete(uid, "quiet period", quiet_since=last)
            elif now - max(since, self.listening_since) >= self.settings.max_wait_seconds:
                job = self._complete(uid, "maximum wait")
            else:
                continue
            if job is not None:
                jobs.append(job)
        return jobs

    def _complete(self, uid: str, reason: str, quiet_since: float | None = None) -> Job | None:
        job = self.store.complete_study(
            uid, reason=reason, now=self.clock(), quiet_since=quiet_since
        )
        if job is None:
            return None
        STUDIES_COMPLETED.labels(reason).inc()
        logger.info(
            "study complete (%s); job queued",
            reason,
            extra={"fields": {"study": study_key(uid), "job": job.id, "version": job.version}},
        )
        if self.on_job is not None:
            self.on_job(job)
        return job
