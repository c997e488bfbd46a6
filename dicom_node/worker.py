"""The job worker: takes queued jobs and runs the study pipeline; its boundary sets job states.

This is the one place where a pipeline's exceptions become job states: :class:`StudySkipped`
→ ``skipped``; any other exception → ``failed`` with a retry after an exponential backoff with
jitter, or ``dead`` once ``jobs.max_attempts`` attempts have failed.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from dicom_node.backoff import backoff_delay
from dicom_node.config import JobSettings
from dicom_node.errors import AnalysisUnavailableError, StudySkipped
from dicom_node.logs import log_context, study_key
from dicom_node.metrics import JOB_SECONDS, JOBS_FINISHED
from dicom_node.pipeline import ReportReference, StudyInput, StudyPipeline, earlier_reports
from dicom_node.store.jobs import Job, JobState, JobStore, OutputFile, until_recorded

logger = logging.getLogger(__name__)


class _Parked(Exception):  # noqa: N818 - not an error: the node's stop parked the job
    """The node's stop parked the job in hand (:meth:`Worker.park`): its outcome is not
    recorded."""

    def __init__(self, job: Job) -> None:
        super().__init__(job.id)
        self.job = job


def _output_file(path: Path) -> OutputFile:
    meta = read_file_meta_info(path)
    return OutputFile(
        path=path,
        sop_class_uid=str(meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
    )


class Worker:
    """Runs jobs one at a time from the job store.

    Parameters
    ----------
    store
        The job store.
    pipeline
        What runs a study.
    settings
        The ``jobs`` section of the configuration.
    work_root
        Folder under which each job gets ``<job id>-v<version>/``.
    """

    def __init__(
        self,
        store: JobStore,
        pipeline: StudyPipeline,
        settings: JobSettings,
        work_root: Path,
        *,
        route: Callable[[StudyInput], Sequence[str]] = lambda _study: (),
        on_outputs: Callable[[], None] = lambda: None,
    ) -> None:
        self.route = route
        self.on_outputs = on_outputs
        self.store = store
        self.pipeline = pipeline
        self.settings = settings
        self.work_root = work_root
        self.wake = threading.Event()
        #: Set by the node's stop before it ends the analysis: a job cut off then is parked
        #: (queued again with its attempt given back), not counted as a failure.
        self.stopping = threading.Event()
        self.busy = False
        self.last_beat = time.monotonic()
        self._loop_stop: threading.Event | None = None
        #: Held while a job is claimed or its outcome recorded, and by :meth:`park`.
        self._settling = threading.Lock()
        self._job: Job | None = None  # the job in hand, claimed and not yet settled
        self._parked: Job | None = None  # the job in hand as park() left it

    def making_progress(self) -> bool:
        """False when the worker loop has not come round for longer than a job may take: its
        time limit, plus, with an isolated analysis, the start of a fresh process that a job
        past its limit waits for (loading the model)."""
        restart = float(getattr(self.pipeline, "start_timeout_seconds", 0.0))
        limit = self.settings.job_timeout_seconds + restart + 60.0
        return time.monotonic() - self.last_beat < limit

    def run_once(self) -> Job | None:
        """Run the next due job, if any; returns the job as it finished."""
        with self._settling:
            job = self.store.claim_next_job(max_attempts=self.settings.max_attempts)
            self._job, self._parked = job, None
        if job is None:
            return None
        self.busy = True
        try:
            return self._run(job)
        except _Parked as parked:
            logger.warning("the job ended after the node's stop parked it; nothing is recorded")
            return parked.job
        finally:
            self.busy = False
            with self._settling:
                self._job = None

    def park(self, *, timeout: float = 6.0) -> Job | None:
        """Put the job in hand back in the queue, its attempt given back (the node stops and
        the pipeline could not be ended: an analysis in this process), and keep this worker
        from recording another outcome for it when the pipeline returns after all. Returns the
        parked job; ``None`` when there was none, its outcome was recorded first, or the job
        store did not take it within ``timeout`` (the job, still ``running``, is then resumed
        at the next start with the attempt counted)."""
        if not self._settling.acquire(timeout=timeout):
            logger.warning("the job in hand could not be parked: its outcome is being recorded")
            return None
        try:
            job = self._job
            if job is None:
                return self._parked
            try:
                self._parked = self.store.requeue(
                    job.id, not_before=0.0, detail="parked: the node stopped during it"
                )
            except Exception:  # the next start's recovery resumes it (its attempt counted)
                logger.exception(
                    "the job could not be parked; it resumes at the next start",
                    extra={"fields": {"job": job.id}},
                )
                return None
            self._job = None
            logger.warning(
                "job parked: the node stops; it resumes at the next start",
                extra={"fields": {"job": job.id}},
            )
            return self._parked
        finally:
            self._settling.release()

    def _run(self, job: Job) -> Job:
        work = self.work_root / f"{job.id}-v{job.version}"
        if work.exists():
            shutil.rmtree(work)  # left by an interrupted attempt; start clean
        work.mkdir(parents=True)
        study = StudyInput(
            job_id=job.id,
            study_uid=job.study_uid,
            version=job.version,
            instances=tuple(self.store.study_instances(job.study_uid)),
            work_dir=work,
            earlier_reports=earlier_reports(self.store.earlier_result(job.study_uid, job.version)),
        )
        started = time.monotonic()
        with log_context(job=job.id, study=study_key(job.study_uid), version=job.version):
            logger.info("job started (attempt %d)", job.attempts)
            # The boundary: every outcome of the pipeline becomes a job state here.
            try:
                result = self.pipeline(study)
                outputs = [_output_file(p) for p in result.outputs]
                # kept with the job, so a later version names them when the files are gone
                reports = [r.as_json() for r in map(ReportReference.read, result.outputs) if r]
                destinations = self.route(study)
            except StudySkipped as exc:
                why = str(exc)
                done = self._settle(
                    lambda: self.store.finish_job(job.id, JobState.SKIPPED, error=why)
                )
                logger.info("job skipped: %s", why)
            except Exception as exc:
                if self.stopping.is_set():
                    logger.warning("the node stops (%s) during the job", type(exc).__name__)
                    return self.park() or job  # (not parked: recovered at the next start)
                if isinstance(exc, AnalysisUnavailableError):
                    delay = self.settings.retry_base_seconds
                    logger.warning("no analysis can run now; the job waits %.0f s", delay)
                    unavailable = str(exc)
                    return self._settle(
                        lambda: self.store.requeue(
                            job.id, not_before=time.time() + delay, detail=unavailable
                        )
                    )
                reason = f"{type(exc).__name__}: {exc}"
                if job.attempts >= self.settings.max_attempts:
                    done = self._settle(
                        lambda: self.store.finish_job(job.id, JobState.DEAD, error=reason)
                    )
                    logger.exception(
                        "job dead after %d attempts (%s)", job.attempts, type(exc).__name__
                    )
                else:
                    delay = backoff_delay(
                        job.attempts,
                        base_seconds=self.settings.retry_base_seconds,
                        max_seconds=self.settings.retry_max_seconds,
                    )
                    done = self._settle(
                        lambda: self.store.finish_job(
                            job.id, JobState.FAILED, error=reason, not_before=time.time() + delay
                        )
                    )
                    logger.exception("job failed (%s); retry in %.0f s", type(exc).__name__, delay)
            else:
                summary = dict(result.summary)
                summary["outputs"] = [str(p) for p in result.outputs]
                summary["reports"] = reports
                done = self._settle(
                    lambda: self.store.finish_with_outputs(
                        job.id, result=summary, outputs=outputs, destinations=destinations
                    )
                )
                if done.state == JobState.SENDING:
                    self.on_outputs()
                logger.info(
                    "job %s",
                    "superseded: its study was re-opened while it ran"
                    if done.state == JobState.SUPERSEDED
                    else "done",
                    extra={"fields": {"seconds": round(time.monotonic() - started, 3)}},
                )
        JOB_SECONDS.observe(time.monotonic() - started)
        JOBS_FINISHED.labels(done.state.value).inc()
        return done

    def _settle(self, record: Callable[[], Job]) -> Job:
        """Record a job's outcome (``record``) however long the job store cannot take it for
        now (:func:`~dicom_node.store.jobs.until_recorded`): a job whose outcome was not
        recorded would stay ``running`` until the next start, its results unsent, with nothing
        for ``dicom-node retry`` to take. While it waits, the worker is waiting on the store,
        not stuck in a job; when the node stops meanwhile, the next start resumes the job.
        Nothing is recorded for a job the node's stop parked meanwhile (:meth:`park`)."""
        self.last_beat = time.monotonic()
        stop = self._loop_stop if self._loop_stop is not None else self.stopping
        with self._settling:
            if self._job is None and self._parked is not None:
                raise _Parked(self._parked)  # the job is the next start's again
            done = until_recorded(record, what="a job's outcome", stop=stop)
            self._job = None
            return done

    def _tend_pipeline(self) -> None:
        """While idle: let a pipeline that keeps a process (the isolated analysis) replace one
        that ended, so that readiness does not wait for the next study."""
        revive: Callable[[], None] | None = getattr(self.pipeline, "revive", None)
        if revive is not None:
            revive()

    def run_forever(self, stop: threading.Event, poll_seconds: float) -> None:
        """Run jobs until ``stop`` is set; finishes the job in hand before returning. An error
        outside a job's boundary (the job store itself failing: a full disk) is logged and the
        loop goes on after a pause; the job it hit resumes at the next start or retry."""
        self._loop_stop = stop  # a job's outcome waiting on the job store gives up at the stop
        while not stop.is_set():
            self.last_beat = time.monotonic()
            try:
                ran = self.run_once()
                if ran is None:
                    self._tend_pipeline()
            except Exception:
                logger.exception("the worker loop failed; trying again")
                ran = None
            if ran is None:
                self.wake.wait(poll_seconds)
                self.wake.clear()
