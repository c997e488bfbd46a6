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

A study heard arriving since the node started is timed on the monotonic clock, from the
moments its instances reached the receiver: a step of the wall clock (an NTP correction, a date
set by hand) neither completes it early nor holds it back. A study left receiving from before
the start is timed by the times the job store recorded, on the wall clock; a step of that clock,
seen against the monotonic clock between two scans, counts as a moment the node was not
listening for such studies: forward, none completes for a quiet period from the step (it would
have seemed quiet); backward, times recorded before the step lie in the future and count from
when they were first seen so (it would have seemed to arrive for as long as the step).
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

#: A difference this large between the wall clock's and the monotonic clock's advance from one
#: scan to the next is a step of the wall clock, not the lag of a busy machine.
_CLOCK_STEP_SECONDS = 5.0


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
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.on_job = on_job
        self.clock = clock
        # a clock that never steps: the system's with the real wall clock, else (a test's
        # settable clock) that clock itself
        self.monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        self.listening_since = clock()
        self._last_scan: tuple[float, float] | None = None
        #: Per study, a recorded time found in the future (after a backward step), and the
        #: moment it was first found so, which stands for it while the record is unchanged.
        self._future: dict[tuple[str, str], tuple[float, float]] = {}
        #: Per study heard since the start, on the monotonic clock: when its (re-)arrival began
        #: and when its latest instance reached the receiver.
        self._heard: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._by_assoc: dict[int, set[str]] = {}
        self._open: Counter[str] = Counter()

    def listening(self) -> None:
        """The node starts to receive now: the timing rules wait one quiet period from here."""
        self.listening_since = self.clock()

    def instance_received(self, assoc: int, study_uid: str) -> None:
        """Note that association ``assoc`` sent an instance of ``study_uid``."""
        steady = self.monotonic()
        with self._lock:
            began, _ = self._heard.get(study_uid, (steady, steady))
            self._heard[study_uid] = (began, steady)
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
        steady = self._notice_clock_steps(now)
        # a sender cut off by the node's stop has not had a quiet period to resume
        restarted = now - self.listening_since < self.settings.stable_seconds
        jobs = []
        receiving = self.store.receiving_studies()
        seen = {uid for uid, _, _ in receiving}
        self._future = {k: v for k, v in self._future.items() if k[0] in seen}
        with self._lock:
            # heard, yet not receiving: duplicates only, refused, or completed meanwhile
            self._heard = {
                uid: (began, last)
                for uid, (began, last) in self._heard.items()
                if uid in seen or steady - last < self.settings.stable_seconds
            }
            heard = dict(self._heard)
        for uid, recorded_since, recorded_last in receiving:
            if uid in heard:
                began, last = heard[uid]
                quiet, waited = steady - last, steady - began
            elif restarted:
                continue
            else:
                since = self._not_after(uid, "since", recorded_since, now)
                last = self._not_after(uid, "last", recorded_last, now)
                quiet, waited = now - last, now - max(since, self.listening_since)
            if quiet >= self.settings.stable_seconds:
                job = self._complete(uid, "quiet period", quiet_since=recorded_last)
            elif waited >= self.settings.max_wait_seconds:
                job = self._complete(uid, "maximum wait")
            else:
                continue
            if job is not None:
                jobs.append(job)
        return jobs

    def _notice_clock_steps(self, now: float) -> float:
        """A step of the wall clock since the last scan (see the module docstring) restarts
        the quiet period of the studies timed on it, as a restart of the node does. Returns
        the monotonic clock's reading."""
        steady = self.monotonic()
        if self._last_scan is not None:
            wall_then, steady_then = self._last_scan
            step = (now - wall_then) - (steady - steady_then)
            if abs(step) > _CLOCK_STEP_SECONDS:
                logger.warning(
                    "the wall clock stepped by %+.0f s; studies left from before the start"
                    " complete after a quiet period from now",
                    step,
                )
                self.listening_since = now
        self._last_scan = (now, steady)
        return steady

    def _not_after(self, uid: str, which: str, recorded: float, now: float) -> float:
        """A recorded time of a study, or, while it lies in the future (a backward step of
        the clock), the moment it was first found there."""
        if recorded <= now:
            self._future.pop((uid, which), None)
            return recorded
        known = self._future.get((uid, which))
        if known is None or known[0] != recorded:
            known = (recorded, now)
            self._future[(uid, which)] = known
        return known[1]

    def _complete(self, uid: str, reason: str, quiet_since: float | None = None) -> Job | None:
        job = self.store.complete_study(
            uid, reason=reason, now=self.clock(), quiet_since=quiet_since
        )
        if job is None:
            return None
        with self._lock:
            self._heard.pop(uid, None)  # what arrives next is a new version's arrival
        STUDIES_COMPLETED.labels(reason).inc()
        logger.info(
            "study complete (%s); job queued",
            reason,
            extra={"fields": {"study": study_key(uid), "job": job.id, "version": job.version}},
        )
        if self.on_job is not None:
            self.on_job(job)
        return job
